"""`FlashMultiHeadAttention` for Flax NNX."""

from __future__ import annotations

from typing import Any, Optional, Union

import jax
from flax import nnx

from jax_flash.flax.attend import SegmentIds, attend, key_value_inputs
from jax_flash.flax.attention_fn import dot_product_attention
from jax_flash.flax.cache import append_to_cache, check_decode_arguments


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
               rngs: nnx.Rngs, **kwargs: Any):
    if "attention_fn" in kwargs:
      raise TypeError("FlashMultiHeadAttention always uses jax_flash; use "
                      "nnx.MultiHeadAttention for another attention_fn")
    super().__init__(num_heads, in_features, qkv_features, out_features,
                     num_kv_heads, in_kv_features,
                     attention_fn=dot_product_attention, rngs=rngs, **kwargs)
    self.implementation = implementation

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

    if decode if decode is not None else bool(self.decode):
      if self.cached_key is None:
        raise ValueError("the autoregressive cache is not initialized: call "
                         "init_cache first")
      check_decode_arguments(segment_ids, q_seq_lengths, kv_seq_lengths)
      key, value, kv_seq_lengths = append_to_cache(
          self.cached_key[...], self.cached_value[...],
          self.cache_index[...], key, value)
      self.cached_key[...] = key
      self.cached_value[...] = value
      self.cache_index[...] = kv_seq_lengths

    rate, dropout_rng = 0.0, None
    if self.dropout_rate > 0:
      if deterministic is None:
        deterministic = bool(self.deterministic)
      if not deterministic:
        stream = self.rngs if rngs is None else rngs
        if isinstance(stream, nnx.Rngs):
          stream = stream.dropout
        if stream is None:
          raise ValueError("dropout needs `rngs`: pass them to the call, or "
                           "construct the layer with keep_rngs=True")
        rate, dropout_rng = self.dropout_rate, stream()

    x = attend(query, key, value, mask=mask, causal=causal or is_causal,
               window_size=window_size, segment_ids=segment_ids,
               q_seq_lengths=q_seq_lengths, kv_seq_lengths=kv_seq_lengths,
               dropout_rate=rate, dropout_rng=dropout_rng,
               implementation=self.implementation)
    return self.out(x, out_sharding=out_sharding)
