"""`FlashMultiHeadAttention` for Flax NNX."""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
from flax import nnx

from jax_flash.flax.attend import SegmentIds, attend, key_value_inputs
from jax_flash.flax.attention_fn import dot_product_attention
from jax_flash.flax.cache import (check_decode_arguments, decode_step,
                                  paged_cache)


class FlashMultiHeadAttention(nnx.MultiHeadAttention):
  """`flax.nnx.MultiHeadAttention` computed by jax_flash.

  It is Flax's layer (same constructor, same state: `query`, `key`, `value`,
  `out`, `query_ln`, `key_ln`, the cache and `init_cache`), so a checkpoint
  of `nnx.MultiHeadAttention` loads unchanged, GQA included
  (`num_kv_heads`). The call adds `causal`, `window_size`, `segment_ids`
  and sequence lengths, which keep attention on jax_flash's fast path;
  a dense `mask` is still exact, on a slower path.

  Args:
    num_heads: number of query heads N.
    in_features: input features of the queries.
    qkv_features: size of the query/key/value projections (default
      in_features); the head dim is qkv_features // num_heads.
    out_features: output features (default in_features).
    num_kv_heads: key/value heads (GQA); default num_heads.
    in_kv_features: input features of keys and values (default in_features).
    implementation: `jax_flash.flash_attention`'s `implementation`.
    cache_block_size: None keeps Flax's contiguous cache; a multiple of 16
      makes `init_cache` build a paged cache of blocks of that many
      positions (see `jax_flash.flax.cache` and `init_cache`).
    rngs: `nnx.Rngs` for initialization and (with dropout) the dropout
      stream.
    **kwargs: the other keyword arguments of `nnx.MultiHeadAttention`
      (dtype, param_dtype, dropout_rate, deterministic, kernel_init,
      bias_init, use_bias, decode, normalize_qk, ...), except `attention_fn`.
  """

  def __init__(self, num_heads: int, in_features: int,
               qkv_features: Optional[int] = None,
               out_features: Optional[int] = None,
               num_kv_heads: Optional[int] = None,
               in_kv_features: Optional[int] = None, *,
               implementation: Optional[str] = None,
               cache_block_size: Optional[int] = None,
               rngs: nnx.Rngs, **kwargs: Any):
    if "attention_fn" in kwargs:
      raise TypeError("FlashMultiHeadAttention always uses jax_flash; use "
                      "nnx.MultiHeadAttention for another attention_fn")
    super().__init__(num_heads, in_features, qkv_features, out_features,
                     num_kv_heads, in_kv_features,
                     attention_fn=dot_product_attention, rngs=rngs, **kwargs)
    self.implementation = implementation
    self.cache_block_size = cache_block_size

  def init_cache(self, input_shape: tuple[int, ...], dtype: Any = jnp.float32,
                 *, num_blocks: Optional[int] = None,
                 block_table: Optional[jax.Array] = None) -> None:
    """Creates an empty cache for inputs of `input_shape`.

    Args:
      input_shape: (batch..., max_length, in_features).
      dtype: dtype of the cached keys and values.
      num_blocks: paged cache only: blocks in the pool (default: enough for
        every row to hold max_length positions).
      block_table: paged cache only: (rows, max_blocks) block ids, rows
        being the product of the batch dims (default: row r owns blocks
        r * max_blocks ... (r + 1) * max_blocks - 1).

    With `cache_block_size` unset this is Flax's cache (`cached_key`,
    `cached_value` (batch..., max_length, Hkv, D), scalar `cache_index`).
    Otherwise `cached_key`, `cached_value` are a pool (num_blocks,
    cache_block_size, Hkv, D), `block_table` the rows' block ids and
    `cache_index` (rows,) the positions each row holds: set it to restart
    rows at other lengths (e.g. after a padded prefill).
    """
    if self.cache_block_size is None:
      if num_blocks is not None or block_table is not None:
        raise ValueError("num_blocks and block_table need a paged cache: "
                         "construct the layer with cache_block_size")
      super().init_cache(input_shape, dtype)
      return
    cache = paged_cache(math.prod(input_shape[:-2]), input_shape[-2],
                        self.cache_block_size, self.num_kv_heads,
                        self.head_dim, dtype, num_blocks=num_blocks,
                        block_table=block_table)
    self.cached_key = nnx.Cache(cache.cached_key)
    self.cached_value = nnx.Cache(cache.cached_value)
    self.block_table = nnx.Cache(cache.block_table)
    self.cache_index = nnx.Cache(cache.cache_index)

  def __call__(self,
               inputs_q: jax.Array,
               inputs_k: Optional[jax.Array] = None,
               inputs_v: Optional[jax.Array] = None,
               *,
               mask: Optional[jax.Array] = None,
               deterministic: Optional[bool] = None,
               rngs: Union[nnx.Rngs, nnx.RngStream, None] = None,
               sow_weights: bool = False,
               decode: Optional[bool] = None,
               causal: bool = False,
               is_causal: bool = False,
               window_size: Optional[tuple[int, int]] = None,
               segment_ids: Optional[SegmentIds] = None,
               q_seq_lengths: Optional[jax.Array] = None,
               kv_seq_lengths: Optional[jax.Array] = None,
               out_sharding: Any = None,
               qkv_sharding: Any = None) -> jax.Array:
    """Projects the inputs, attends, and projects back.

    Args:
      inputs_q: (batch..., Sq, in_features) queries.
      inputs_k: (batch..., Sk, in_kv_features) keys; default inputs_q.
      inputs_v: (batch..., Sk, in_kv_features) values; default inputs_k.
      mask: boolean, broadcastable to (batch..., N, Sq, Sk). Correct but
        slower than the structured options below; prefer those.
      deterministic: disables dropout; overrides the attribute.
      rngs: dropout randomness; overrides the stream kept at construction.
      sow_weights: must be False: jax_flash never forms attention weights.
      decode: use the cache (after `init_cache`); overrides the attribute.
        A call may append one or several positions.
      causal: causal mask, aligned bottom-right (the last query sees the
        last key); while decoding, the new positions see the cache.
      is_causal: the name Flax's layer uses; the same as `causal` here
        (Flax's alignment differs only when Sq != Sk outside decoding).
      window_size: (left, right) local attention, -1 for unbounded.
      segment_ids: packed sequences: (batch..., S) ids, or a pair for
        Sq != Sk; a query sees keys of its own segment only.
      q_seq_lengths: (batch...) valid query lengths (right padding).
      kv_seq_lengths: (batch...) valid key lengths (right padding).
      out_sharding: sharding of the output projection's result.
      qkv_sharding: sharding of the query/key/value projections' results.

    Returns:
      (batch..., Sq, out_features).
    """
    inputs_k, inputs_v = key_value_inputs(inputs_q, inputs_k, inputs_v,
                                          sow_weights)
    if inputs_q.shape[-1] != self.in_features:
      raise ValueError(f"expected {self.in_features} input features, got "
                       f"inputs_q of shape {inputs_q.shape}")

    query = self.query(inputs_q, out_sharding=qkv_sharding)
    key = self.key(inputs_k, out_sharding=qkv_sharding)
    value = self.value(inputs_v, out_sharding=qkv_sharding)
    if self.normalize_qk:
      query = self.query_ln(query)
      key = self.key_ln(key)

    decoding = decode if decode is not None else bool(self.decode)
    if decoding and self.cached_key is None:
      raise ValueError("the autoregressive cache is not initialized: call "
                       "init_cache first")
    rate, dropout_rng = self._dropout(deterministic, rngs)
    if decoding:
      check_decode_arguments(segment_ids, q_seq_lengths, kv_seq_lengths)
      block_table = (None if self.cache_block_size is None else
                     self.block_table[...])
      x, keys, values, index = decode_step(
          self.cached_key[...], self.cached_value[...],
          self.cache_index[...], query, key, value, block_table=block_table,
          mask=mask, causal=causal or is_causal, window_size=window_size,
          dropout_rate=rate, dropout_rng=dropout_rng,
          implementation=self.implementation)
      self.cached_key[...] = keys
      self.cached_value[...] = values
      self.cache_index[...] = index
    else:
      x = attend(query, key, value, mask=mask, causal=causal or is_causal,
                 window_size=window_size, segment_ids=segment_ids,
                 q_seq_lengths=q_seq_lengths, kv_seq_lengths=kv_seq_lengths,
                 dropout_rate=rate, dropout_rng=dropout_rng,
                 implementation=self.implementation)
    return self.out(x, out_sharding=out_sharding)

  def _dropout(self, deterministic: Optional[bool],
               rngs: Union[nnx.Rngs, nnx.RngStream, None]
               ) -> tuple[float, Optional[jax.Array]]:
    """(rate, key) of this call's attention dropout; (0, None) for none."""
    if self.dropout_rate <= 0:
      return 0.0, None
    if deterministic is None:
      deterministic = bool(self.deterministic)
    if deterministic:
      return 0.0, None
    stream = self.rngs if rngs is None else rngs
    if isinstance(stream, nnx.Rngs):
      stream = stream.dropout
    if stream is None:
      raise ValueError("dropout needs `rngs`: pass them to the call, or "
                       "construct the layer with keep_rngs=True")
    return self.dropout_rate, stream()
