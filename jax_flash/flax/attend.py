"""One attention call in Flax's layout, routed to the fast or the dense path.

Flax arrays carry any number of leading batch dimensions:
query (batch..., Sq, H, D), key (batch..., Sk, Hkv, D), value
(batch..., Sk, Hkv, Dv), and masks broadcastable to (batch..., H, Sq, Sk).
`attend` folds the batch dimensions into one, calls
`jax_flash.flash_attention` when every mask is structured (causal, window,
segment ids, lengths) and `dense_mask.masked_attention` when a dense mask or
bias is present, and unfolds the result.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import jax
import jax.numpy as jnp

import jax_flash
from jax_flash.attention import SegmentIds, normalize_arguments
from jax_flash.flax.dense_mask import masked_attention


def attend(query: jax.Array, key: jax.Array, value: jax.Array, *,
           mask: Optional[jax.Array] = None,
           bias: Optional[jax.Array] = None,
           causal: bool = False,
           window_size: Optional[tuple[int, int]] = None,
           segment_ids: Optional[SegmentIds] = None,
           q_seq_lengths: Optional[jax.Array] = None,
           kv_seq_lengths: Optional[jax.Array] = None,
           dropout_rate: float = 0.0,
           dropout_rng: Optional[jax.Array] = None,
           implementation: Optional[str] = None) -> jax.Array:
  """Attention over arrays with any number of leading batch dimensions.

  Args:
    query: (batch..., Sq, H, D); key: (batch..., Sk, Hkv, D); value:
      (batch..., Sk, Hkv, Dv); promoted to their common dtype (a cache kept
      in float32 may meet bfloat16 queries).
    mask: boolean, broadcastable to (batch..., H, Sq, Sk); False hides a key.
      Selects the dense path.
    bias: float, broadcastable to (batch..., H, Sq, Sk), added to the scaled
      logits. Selects the dense path.
    causal, window_size: as in `jax_flash.flash_attention` (bottom-right
      aligned).
    segment_ids: (batch..., S) ids for self-attention, or a pair
      ((batch..., Sq), (batch..., Sk)).
    q_seq_lengths, kv_seq_lengths: integer lengths broadcastable to
      (batch...).
    dropout_rate, dropout_rng: attention dropout, applied when the rate is
      positive (callers pass 0 for deterministic calls).
    implementation: passed to `jax_flash.flash_attention` on the fast path;
      the dense path is always pure JAX ("cuda" with a mask or bias raises).

  Returns:
    (batch..., Sq, H, Dv) in the common dtype.
  """
  batch_shape = query.shape[:-3]
  for name, x in (("key", key), ("value", value)):
    if x.shape[:-3] != batch_shape:
      raise ValueError(
          f"query and {name} must share their batch dimensions, got query "
          f"{query.shape} and {name} {x.shape}")
  dtype = jnp.result_type(query, key, value)
  q, k, v = (_fold(x).astype(dtype) for x in (query, key, value))
  sq, heads = query.shape[-3], query.shape[-2]
  sk = key.shape[-3]
  ids = _fold_segment_ids(segment_ids, batch_shape, sq, sk)
  q_len = _fold_lengths(q_seq_lengths, batch_shape)
  kv_len = _fold_lengths(kv_seq_lengths, batch_shape)
  if mask is None and bias is None:
    out = jax_flash.flash_attention(
        q, k, v, causal=causal, window_size=window_size, segment_ids=ids,
        q_seq_lengths=q_len, kv_seq_lengths=kv_len,
        dropout_rate=dropout_rate, dropout_rng=dropout_rng,
        implementation=implementation)
  else:
    if implementation == "cuda":
      given = ", ".join(f"{name} of shape {jnp.shape(x)}" for name, x in
                        (("mask", mask), ("bias", bias)) if x is not None)
      raise ValueError(f"implementation='cuda' cannot serve a dense mask or "
                       f"bias, got {given}; express the mask as causal, "
                       "window_size, segment_ids or sequence lengths")
    _, _, _, config, masks, _ = normalize_arguments(
        q, k, v, causal=causal, window_size=window_size, segment_ids=ids,
        q_seq_lengths=q_len, kv_seq_lengths=kv_len, dropout_rate=dropout_rate,
        dropout_rng=dropout_rng)
    target = batch_shape + (heads, sq, sk)
    if mask is not None:
      mask = _fold_pairwise("mask", jnp.asarray(mask, jnp.bool_), target)
    if bias is not None:
      bias = _fold_pairwise("bias", jnp.asarray(bias), target)
    out = masked_attention(q, k, v, config, masks, mask, bias)
  return out.reshape(batch_shape + out.shape[1:])


def _fold(x: jax.Array) -> jax.Array:
  """(batch..., S, N, D) -> (prod(batch), S, N, D)."""
  return x.reshape((math.prod(x.shape[:-3]),) + x.shape[-3:])


def _fold_segment_ids(segment_ids: SegmentIds, batch_shape: tuple[int, ...],
                      sq: int, sk: int) -> Any:
  if segment_ids is None:
    return None
  if isinstance(segment_ids, (tuple, list)):
    if len(segment_ids) != 2:
      raise ValueError("segment_ids must be one array or a pair (q_ids, "
                       f"kv_ids), got a sequence of {len(segment_ids)}")
    q_ids, kv_ids = segment_ids
  elif sq == sk:
    q_ids = kv_ids = segment_ids
  else:
    raise ValueError("a single segment_ids array needs Sq == Sk; pass a pair "
                     f"(q_ids, kv_ids) for Sq={sq}, Sk={sk}, got segment_ids "
                     f"of shape {jnp.shape(segment_ids)}")
  folded = []
  for name, ids, length in (("query", q_ids, sq), ("key", kv_ids, sk)):
    ids = jnp.asarray(ids)
    if ids.shape != batch_shape + (length,):
      raise ValueError(f"{name} segment ids must have shape "
                       f"{batch_shape + (length,)}, got {ids.shape}")
    folded.append(ids.reshape(-1, length))
  return tuple(folded)


def _fold_lengths(lengths: Optional[jax.Array],
                  batch_shape: tuple[int, ...]) -> Optional[jax.Array]:
  if lengths is None:
    return None
  return jnp.broadcast_to(jnp.asarray(lengths, jnp.int32),
                          batch_shape).reshape(-1)


def _fold_pairwise(name: str, x: jax.Array,
                   target: tuple[int, ...]) -> jax.Array:
  """A mask or bias broadcastable to target as (B|1, H|1, Sq|1, Sk|1)."""
  try:
    fits = jnp.broadcast_shapes(x.shape, target) == target
  except ValueError:
    fits = False
  if not fits:
    raise ValueError(f"{name} must be broadcastable to (batch..., H, Sq, Sk) "
                     f"= {target}, got shape {x.shape}")
  x = x.reshape((1,) * (len(target) - x.ndim) + x.shape)
  batch_dims = x.shape[:-3]
  if all(d == 1 for d in batch_dims):
    return x.reshape((1,) + x.shape[-3:])
  x = jnp.broadcast_to(x, target[:-3] + x.shape[-3:])
  return x.reshape((-1,) + x.shape[-3:])


def key_value_inputs(inputs_q: jax.Array, inputs_k: Optional[jax.Array],
                     inputs_v: Optional[jax.Array], sow_weights: bool
                     ) -> tuple[jax.Array, jax.Array]:
  """(inputs_k, inputs_v) with Flax's defaults: k from q, v from k.

  Also refuses `sow_weights`, which jax_flash's layers cannot honour.
  """
  if sow_weights:
    raise ValueError("FlashMultiHeadAttention cannot sow attention weights "
                     "(got sow_weights=True): jax_flash never materializes "
                     "them")
  if inputs_k is None:
    if inputs_v is not None:
      raise ValueError("inputs_k cannot be None when inputs_v is given, got "
                       f"inputs_v of shape {inputs_v.shape}")
    inputs_k = inputs_q
  return inputs_k, inputs_k if inputs_v is None else inputs_v
