"""The public entry point: `flash_attention_with_kv_cache`."""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from jax_flash import validation
from jax_flash.attention import Implementation, normalize_arguments
from jax_flash.decode import append, dispatch
from jax_flash.decode import validation as cache_validation


class KVCacheAttention(NamedTuple):
  """What `flash_attention_with_kv_cache` returns.

  Attributes:
    out: (B, Sq, H, Dv) attention output in the query's dtype.
    key_cache: the key cache with the new keys written (the input when no
      new tokens were given).
    value_cache: the value cache, likewise.
    cache_seq_lengths: (B,) int32 valid positions after the call:
      min(cache_seq_lengths + Sq, capacity) with new tokens, else
      cache_seq_lengths clamped to [0, capacity].
    lse: (B, H, Sq) float32 log-sum-exp of the logits with
      return_lse=True, else None.
  """

  out: jax.Array
  key_cache: jax.Array
  value_cache: jax.Array
  cache_seq_lengths: jax.Array
  lse: Optional[jax.Array]


def flash_attention_with_kv_cache(
    query: jax.Array,
    key_cache: jax.Array,
    value_cache: jax.Array,
    *,
    cache_seq_lengths: jax.Array,
    block_table: Optional[jax.Array] = None,
    new_key: Optional[jax.Array] = None,
    new_value: Optional[jax.Array] = None,
    causal: bool = False,
    window_size: Optional[tuple[int, int]] = None,
    softcap: Optional[float] = None,
    alibi_slopes: Optional[jax.Array] = None,
    softmax_scale: Optional[float] = None,
    return_lse: bool = False,
    implementation: Implementation = None,
) -> KVCacheAttention:
  """Attention of a few new queries against a key/value cache (decoding).

  Letters: B batch, Sq new query tokens (1 for plain decoding, up to 16 for
  speculative decoding; longer queries, e.g. a prefill, work too), H query
  heads, Hkv key/value heads (H % Hkv == 0: the query heads of one K/V head
  read it once), D query/key head dim, Dv value head dim, S_max positions of
  a contiguous cache row, capacity the positions a row can hold.

  Two cache layouts:
    contiguous: key_cache (B, S_max, Hkv, D), value_cache (B, S_max, Hkv,
      Dv); row b's position p is key_cache[b, p]; capacity = S_max.
    paged (block_table given): key_cache (num_blocks, block_size, Hkv, D),
      value_cache (num_blocks, block_size, Hkv, Dv), a pool of blocks shared
      by the rows; block_table (B, max_blocks) integer; row b's position p
      is key_cache[block_table[b, p // block_size], p % block_size];
      capacity = max_blocks * block_size. block_size is a multiple of 16.

  With new_key/new_value, new token i of row b is first written at position
  cache_seq_lengths[b] + i (in place: under `jit` with the caches donated,
  the cache is not copied), then the queries attend to positions
  [0, cache_seq_lengths[b] + Sq) of their row, query i standing at position
  cache_seq_lengths[b] + i. Without new tokens they attend to
  [0, cache_seq_lengths[b]), the queries being its last Sq positions.
  `causal`, `window_size` and alibi align each row's diagonal bottom-right
  in this sense, per row, exactly as `flash_attention` with kv_seq_lengths.

  Values that do not fit never touch memory outside the caches:
    * cache_seq_lengths are clamped to [0, capacity];
    * new tokens that would run past the capacity are written at its end
      instead, at [capacity - Sq, capacity), overwriting the row's last
      cached positions (as Flax's cache does); the row is then full and the
      queries stand at those positions;
    * a block_table entry outside [0, num_blocks) is an empty block: it is
      neither read (its positions are masked) nor written (tokens that
      would go there are dropped; their queries still attend to the rest).

  Args:
    query: (B, Sq, H, D) float32, bfloat16 or float16.
    key_cache: see the layouts; the query's dtype.
    value_cache: see the layouts; the query's dtype.
    cache_seq_lengths: (B,) integers, valid positions of each row before
      the new tokens are appended.
    block_table: (B, max_blocks) integer block ids of a paged cache.
    new_key: (B, Sq, Hkv, D) keys of the query tokens, in the cache's dtype.
    new_value: (B, Sq, Hkv, Dv) values of the query tokens.
    causal, window_size, softcap, alibi_slopes, softmax_scale: as in
      `jax_flash.flash_attention` (alibi_slopes (H,) or (B, H)).
    return_lse: also return the log-sum-exp.
    implementation: None picks the split-KV CUDA kernel where it serves
      the call (it reads either cache layout in place;
      JAX_FLASH_DECODE_KERNEL=0 turns it off), else the
      blockwise path; "cuda" the kernel or an error saying why not; "xla"
      the blockwise pure-JAX path (paged caches gathered in JAX, see
      `jax_flash.decode.paged`); "reference" the plain attention.

  Returns:
    A `KVCacheAttention` (out, key_cache, value_cache, cache_seq_lengths,
    lse): unpack it as a tuple or read its fields.

  Raises:
    TypeError, ValueError: at trace time, naming the offending argument and
      its shape (also when Sq new tokens exceed the capacity).
  """
  validation.check_implementation(implementation)
  checked = cache_validation.check_cache_arguments(
      query, key_cache, value_cache, cache_seq_lengths, block_table, new_key,
      new_value)
  lengths = jnp.clip(checked.cache_seq_lengths, 0, checked.capacity)
  if new_key is not None:
    start = append.append_start(lengths, query.shape[1], checked.capacity)
    key_cache, value_cache = append.append_tokens(
        key_cache, value_cache, new_key, new_value, start,
        checked.block_table)
    # The queries are the last Sq of the row's keys.
    lengths = start + query.shape[1]
  key_view, value_view = cache_validation.cache_view_shape(
      query, value_cache, checked.capacity)
  call = normalize_arguments(
      query, key_view, value_view, softmax_scale=softmax_scale,
      causal=causal, window_size=window_size, softcap=softcap,
      alibi_slopes=alibi_slopes, kv_seq_lengths=lengths)
  attend = dispatch.select_cache_attention(implementation, query, key_cache,
                                          value_cache)
  out, lse = attend(query, key_cache, value_cache, checked.block_table,
                    call.config, call.masks)
  return KVCacheAttention(out, key_cache, value_cache, lengths,
                          lse if return_lse else None)
