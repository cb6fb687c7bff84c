"""The autoregressive key/value cache shared by the Linen and NNX layers.

Two layouts:

* contiguous (the default) is Flax's: cached keys and values
  (batch..., max_length, Hkv, D) and a scalar int32 `cache_index`, the
  positions filled in every row, so a cache built by Flax's own layers is
  read unchanged;
* paged (`cache_block_size` set on the layer): a pool of blocks
  (num_blocks, block_size, Hkv, D) shared by the rows, a `block_table`
  (rows, max_blocks) of block ids and a per-row `cache_index` (rows,), see
  `jax_flash.flash_attention_with_kv_cache`. Rows may then hold sequences
  of different lengths.

One call may append several positions (a prefill, or speculative tokens);
the n new queries see the cache and, with `causal`, are aligned with the
last n keys of their row. Positions that do not fit go to the end of the
row, overwriting its last ones, as in Flax's layer.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from jax_flash.decode import append, flash_attention_with_kv_cache
from jax_flash.flax.attend import attend


class PagedCache(NamedTuple):
  """Initial state of a paged cache.

  Attributes:
    cached_key: (num_blocks, block_size, Hkv, D) zeros.
    cached_value: (num_blocks, block_size, Hkv, Dv) zeros.
    block_table: (rows, max_blocks) int32.
    cache_index: (rows,) int32 zeros.
  """

  cached_key: jax.Array
  cached_value: jax.Array
  block_table: jax.Array
  cache_index: jax.Array


def paged_cache(rows: int, max_length: int, block_size: int, kv_heads: int,
                head_dim: int, dtype: Any, *,
                value_dim: Optional[int] = None,
                num_blocks: Optional[int] = None,
                block_table: Optional[jax.Array] = None) -> PagedCache:
  """An empty paged cache holding up to `max_length` positions per row.

  Args:
    rows: batch rows (the product of the batch dims).
    max_length: positions per row; the table has
      ceil(max_length / block_size) entries per row.
    block_size: positions per block, a multiple of 16.
    kv_heads: Hkv.
    head_dim: D of the keys.
    dtype: dtype of the pool.
    value_dim: Dv of the values (default head_dim).
    num_blocks: blocks in the pool (default: one per table entry).
    block_table: (rows, max_blocks) ids to use instead of giving row r the
      blocks r * max_blocks ... (r + 1) * max_blocks - 1.
  """
  if block_table is None:
    max_blocks = -(-max_length // block_size)
    block_table = jnp.arange(rows * max_blocks,
                             dtype=jnp.int32).reshape(rows, max_blocks)
  block_table = jnp.asarray(block_table, jnp.int32)
  if num_blocks is None:
    num_blocks = block_table.size
  pool = lambda d: jnp.zeros((num_blocks, block_size, kv_heads, d), dtype)
  return PagedCache(pool(head_dim), pool(value_dim or head_dim), block_table,
                    jnp.zeros((rows,), jnp.int32))


def decode_step(cached_key: jax.Array, cached_value: jax.Array,
                cache_index: jax.Array, query: jax.Array, key: jax.Array,
                value: jax.Array, *, block_table: Optional[jax.Array] = None,
                mask: Optional[jax.Array] = None, causal: bool = False,
                window_size: Optional[tuple[int, int]] = None,
                dropout_rate: float = 0.0,
                dropout_rng: Optional[jax.Array] = None,
                implementation: Optional[str] = None
                ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Appends n new positions to the cache and attends to it.

  Args:
    cached_key, cached_value: the caches, contiguous (batch...,
      max_length, Hkv, D|Dv) or, with a block table, paged
      (num_blocks, block_size, Hkv, D|Dv).
    cache_index: a scalar (every row) or (batch...) int32 array of filled
      positions.
    query: (batch..., n, H, D); cast to the cache's dtype.
    key, value: (batch..., n, Hkv, D|Dv) of the new positions; cast to the
      cache's dtype, in which attention is computed.
    block_table: (rows, max_blocks) int32 of a paged cache.
    mask: boolean, broadcastable to (batch..., H, n, max_length): a dense
      mask, on the slower dense path (contiguous caches only).
    causal, window_size: as in `jax_flash.flash_attention`.
    dropout_rate, dropout_rng: attention dropout (dense path).
    implementation: as in `jax_flash.flash_attention`.

  Returns:
    (out (batch..., n, H, Dv), cached_key, cached_value, cache_index): the
    output in the cache's dtype, the updated caches and the updated index
    (of its input shape), capped at the capacity.
  """
  batch_shape = query.shape[:-3]
  rows = math.prod(batch_shape)
  fold = lambda x: x.reshape((rows,) + x.shape[len(batch_shape):])
  unfold = lambda x: x.reshape(batch_shape + x.shape[1:])
  paged = block_table is not None
  keys, values = ((cached_key, cached_value) if paged else
                  (fold(cached_key), fold(cached_value)))
  capacity = (block_table.shape[1] * keys.shape[1] if paged else
              keys.shape[1])
  lengths = jnp.clip(jnp.broadcast_to(jnp.asarray(cache_index, jnp.int32),
                                      batch_shape).reshape(rows), 0, capacity)
  queries, new_key, new_value = (fold(x).astype(keys.dtype)
                                 for x in (query, key, value))
  if mask is None and dropout_rate == 0:
    out, keys, values, lengths, _ = flash_attention_with_kv_cache(
        queries, keys, values, cache_seq_lengths=lengths,
        block_table=block_table, new_key=new_key, new_value=new_value,
        causal=causal, window_size=window_size,
        implementation=implementation)
  elif paged:
    raise ValueError("a paged cache cannot be combined with a dense `mask` "
                     "or dropout; use causal/window_size, or the contiguous "
                     "cache")
  else:
    start = append.append_start(lengths, queries.shape[1], capacity)
    keys, values = append.append_tokens(keys, values, new_key, new_value,
                                        start, None)
    lengths = start + queries.shape[1]
    out = fold(attend(unfold(queries), unfold(keys), unfold(values),
                      mask=mask, causal=causal, window_size=window_size,
                      kv_seq_lengths=unfold(lengths),
                      dropout_rate=dropout_rate, dropout_rng=dropout_rng,
                      implementation=implementation))
  if not paged:
    keys, values = unfold(keys), unfold(values)
  index = lengths[0] if jnp.ndim(cache_index) == 0 else unfold(lengths)
  return unfold(out), keys, values, index


def check_decode_arguments(segment_ids: object, q_seq_lengths: object,
                           kv_seq_lengths: object) -> None:
  """Decoding derives the key lengths from the cache; nothing may override."""
  given = [name for name, x in (("segment_ids", segment_ids),
                                ("q_seq_lengths", q_seq_lengths),
                                ("kv_seq_lengths", kv_seq_lengths))
           if x is not None]
  if given:
    raise ValueError(
        f"{', '.join(given)} cannot be combined with decode=True: the cache "
        "index sets the key lengths; pass a boolean `mask` to hide cached "
        "positions instead")
