"""`FlashMultiHeadAttention` for Flax Linen."""

from __future__ import annotations

import functools
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.linear import default_kernel_init

from jax_flash.flax.attend import SegmentIds, attend, key_value_inputs
from jax_flash.flax.cache import (check_decode_arguments, decode_step,
                                  paged_cache)


class FlashMultiHeadAttention(nn.Module):
  """`flax.linen.MultiHeadDotProductAttention` computed by jax_flash.

  The parameters are those of Flax's layer: `query`, `key`, `value`
  (DenseGeneral kernels (F, N, H) and biases (N, H)), `out` (kernel
  (N, H, F_out), bias (F_out)) and, with `normalize_qk`, `query_ln` and
  `key_ln`; the cache collection holds Flax's `cached_key`, `cached_value`
  and `cache_index`. A checkpoint of Flax's layer therefore loads unchanged
  when `num_kv_heads` is unset. Note that Linen names an unnamed submodule
  after its class: inside a larger model, give the layer the name the
  checkpoint uses (e.g. `name="MultiHeadDotProductAttention_0"`).

  Attributes:
    num_heads: number of query heads N; the features must divide by it.
    dtype: computation dtype (default: inferred from inputs and params).
    param_dtype: dtype of the parameters.
    qkv_features: size of the query/key/value projections (default: the
      input features); the head dim is qkv_features // num_heads.
    out_features: size of the output (default: the input features).
    num_kv_heads: key/value heads for grouped-query attention; must divide
      num_heads. None means num_heads (Flax's layer, same parameters).
    broadcast_dropout: accepted for compatibility; jax_flash draws the
      dropout mask per batch row and head.
    dropout_rate: attention dropout rate.
    deterministic: default for the call's `deterministic` (no dropout).
    precision: precision of the projections.
    kernel_init: initializer of the projection kernels.
    out_kernel_init: initializer of the output kernel (default kernel_init).
    bias_init: initializer of the projection biases.
    out_bias_init: initializer of the output bias (default bias_init).
    use_bias: whether the projections have biases.
    decode: use the autoregressive cache: `init` with a full-length input
      sizes it, then each call appends its positions (one or more).
    cache_block_size: None keeps Flax's contiguous cache; a multiple of 16
      makes the cache paged (see `jax_flash.flax.cache`): `cached_key` and
      `cached_value` become a pool (rows * max_blocks, cache_block_size,
      Hkv, D), with `block_table` (rows, max_blocks) giving row r blocks
      r * max_blocks ... and `cache_index` (rows,) per-row lengths, rows
      being the product of the batch dims. Replace these variables in the
      "cache" collection for another pool or table.
    normalize_qk: LayerNorm on queries and keys (arxiv.org/abs/2302.05442).
    implementation: `jax_flash.flash_attention`'s `implementation`.
  """

  num_heads: int
  dtype: Any = None
  param_dtype: Any = jnp.float32
  qkv_features: Optional[int] = None
  out_features: Optional[int] = None
  num_kv_heads: Optional[int] = None
  broadcast_dropout: bool = True
  dropout_rate: float = 0.0
  deterministic: Optional[bool] = None
  precision: Any = None
  kernel_init: Any = default_kernel_init
  out_kernel_init: Any = None
  bias_init: Any = nn.initializers.zeros_init()
  out_bias_init: Any = None
  use_bias: bool = True
  decode: bool = False
  normalize_qk: bool = False
  implementation: Optional[str] = None
  cache_block_size: Optional[int] = None

  @nn.compact
  def __call__(self,
               inputs_q: jax.Array,
               inputs_k: Optional[jax.Array] = None,
               inputs_v: Optional[jax.Array] = None,
               *,
               mask: Optional[jax.Array] = None,
               deterministic: Optional[bool] = None,
               dropout_rng: Optional[jax.Array] = None,
               sow_weights: bool = False,
               causal: bool = False,
               window_size: Optional[tuple[int, int]] = None,
               segment_ids: Optional[SegmentIds] = None,
               q_seq_lengths: Optional[jax.Array] = None,
               kv_seq_lengths: Optional[jax.Array] = None) -> jax.Array:
    """Projects the inputs, attends, and projects back.

    Args:
      inputs_q: (batch..., Sq, F) queries.
      inputs_k: (batch..., Sk, F_kv) keys; default inputs_q.
      inputs_v: (batch..., Sk, F_kv) values; default inputs_k.
      mask: boolean, broadcastable to (batch..., N, Sq, Sk). Correct but
        slower than the structured options below; prefer those.
      deterministic: disables dropout; overrides the attribute.
      dropout_rng: key for dropout; default `self.make_rng("dropout")`.
      sow_weights: must be False: jax_flash never forms attention weights.
      causal: causal mask, aligned bottom-right (the last query sees the
        last key); while decoding, the new positions see the cache.
      window_size: (left, right) local attention, -1 for unbounded.
      segment_ids: packed sequences: (batch..., S) ids, or a pair for
        Sq != Sk; a query sees keys of its own segment only.
      q_seq_lengths: (batch...) valid query lengths (right padding); rows
        past them output zeros.
      kv_seq_lengths: (batch...) valid key lengths (right padding).

    Returns:
      (batch..., Sq, out_features).
    """
    inputs_k, inputs_v = key_value_inputs(inputs_q, inputs_k, inputs_v,
                                          sow_weights)
    features = self.out_features or inputs_q.shape[-1]
    qkv_features = self.qkv_features or inputs_q.shape[-1]
    kv_heads = self.num_kv_heads or self.num_heads
    if qkv_features % self.num_heads or self.num_heads % kv_heads:
      raise ValueError(
          f"qkv_features ({qkv_features}) must be divisible by num_heads "
          f"({self.num_heads}), and num_heads by num_kv_heads ({kv_heads})")
    head_dim = qkv_features // self.num_heads

    dense = functools.partial(
        nn.DenseGeneral, axis=-1, dtype=self.dtype,
        param_dtype=self.param_dtype, kernel_init=self.kernel_init,
        bias_init=self.bias_init, use_bias=self.use_bias,
        precision=self.precision)
    query = dense(features=(self.num_heads, head_dim), name="query")(inputs_q)
    key = dense(features=(kv_heads, head_dim), name="key")(inputs_k)
    value = dense(features=(kv_heads, head_dim), name="value")(inputs_v)
    if self.normalize_qk:
      norm = functools.partial(nn.LayerNorm, use_bias=False, dtype=self.dtype,
                               param_dtype=self.param_dtype)
      query = norm(name="query_ln")(query)
      key = norm(name="key_ln")(key)

    rate, rng = 0.0, None
    if self.dropout_rate > 0:
      if not nn.merge_param("deterministic", self.deterministic,
                            deterministic):
        rate = self.dropout_rate
        rng = dropout_rng if dropout_rng is not None else self.make_rng(
            "dropout")

    if self.decode and self.has_variable("cache", "cached_key"):
      check_decode_arguments(segment_ids, q_seq_lengths, kv_seq_lengths)
      cache = self._cache(key, value)
      block_table = (None if self.cache_block_size is None else
                     cache["block_table"].value)
      x, keys, values, index = decode_step(
          cache["cached_key"].value, cache["cached_value"].value,
          cache["cache_index"].value, query, key, value,
          block_table=block_table, mask=mask, causal=causal,
          window_size=window_size, dropout_rate=rate, dropout_rng=rng,
          implementation=self.implementation)
      cache["cached_key"].value, cache["cached_value"].value = keys, values
      cache["cache_index"].value = index
    else:
      if self.decode:  # `init`: the input's shape sizes the cache
        self._cache(key, value)
      x = attend(query, key, value, mask=mask, causal=causal,
                 window_size=window_size, segment_ids=segment_ids,
                 q_seq_lengths=q_seq_lengths, kv_seq_lengths=kv_seq_lengths,
                 dropout_rate=rate, dropout_rng=rng,
                 implementation=self.implementation)
    return nn.DenseGeneral(
        features=features, axis=(-2, -1),
        kernel_init=self.out_kernel_init or self.kernel_init,
        bias_init=self.out_bias_init or self.bias_init,
        use_bias=self.use_bias, dtype=self.dtype,
        param_dtype=self.param_dtype, precision=self.precision,
        name="out")(x)

  def _cache(self, key: jax.Array, value: jax.Array) -> dict[str, Any]:
    """The cache variables, created for keys/values of this shape if new."""
    if self.cache_block_size is None:
      initial = lambda: {"cached_key": jnp.zeros(key.shape, key.dtype),
                         "cached_value": jnp.zeros(value.shape, value.dtype),
                         "cache_index": jnp.array(0, jnp.int32)}
    else:
      initial = lambda: paged_cache(
          math.prod(key.shape[:-3]), key.shape[-3], self.cache_block_size,
          key.shape[-2], key.shape[-1], key.dtype,
          value_dim=value.shape[-1])._asdict()
    names = ["cached_key", "cached_value", "cache_index"]
    if self.cache_block_size is not None:
      names.append("block_table")
    return {name: self.variable("cache", name, lambda n=name: initial()[n])
            for name in names}
