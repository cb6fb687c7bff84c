"""Attention under an arbitrary dense boolean mask and additive bias.

Flax's `attention_fn` contract hands over a mask broadcastable to
(B, H, Sq, Sk), which no structured mask (causal, window, segment ids,
lengths) can stand for in general. This path serves it without an Sq x Sk
float array: queries are processed in chunks of `CHUNK_Q` rows under
`jax.checkpoint`, so the forward keeps one (B, H, chunk, Sk) tile alive and
the backward recomputes each tile instead of storing it. Structured masks,
softcap and dropout come from `jax_flash.masking`, so the semantics (and the
dropout mask) are those of `jax_flash.flash_attention`.

Letters as in `jax_flash.config`; G = H // Hkv query heads per K/V head.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from jax_flash import layout, masking
from jax_flash.config import AttentionConfig, MaskArrays

# 128 query rows per chunk: a (B, H, 128, Sk) float32 tile is 1/8 of the full
# score matrix at Sq = 1024 and shrinks relative to it as Sq grows.
CHUNK_Q = 128


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                     config: AttentionConfig, masks: MaskArrays,
                     mask: Optional[jax.Array],
                     bias: Optional[jax.Array]) -> jax.Array:
  """Attention with a dense mask and bias on top of the structured masks.

  Args:
    q: (B, Sq, H, D); k: (B, Sk, Hkv, D); v: (B, Sk, Hkv, Dv), one dtype.
    config: static options (scale, causal, window, softcap, dropout).
    masks: batched structured masks and the dropout seed.
    mask: boolean (B|1, H|1, Sq|1, Sk|1); False hides a key, or None.
    bias: float (B|1, H|1, Sq|1, Sk|1) added to the scaled logits, or None.

  Returns:
    (B, Sq, H, Dv) in q's dtype. A query that sees no key outputs 0.
  """
  batch, sq, heads, _ = q.shape
  sk, kv_heads, dv = k.shape[1], k.shape[2], v.shape[3]
  chunk = min(CHUNK_Q, sq)
  num_chunks = -(-sq // chunk)
  padded_sq = num_chunks * chunk
  qg = layout.pad_axis(layout.group_queries(q, kv_heads), 3, padded_sq)
  kh, vh = layout.heads_major(k), layout.heads_major(v)
  mask = _pad_queries(_grouped(mask, heads, kv_heads), padded_sq)
  bias = _pad_queries(_grouped(bias, heads, kv_heads), padded_sq)
  k_pos = jnp.arange(sk, dtype=jnp.int32)
  score_shape = (batch, kv_heads, heads // kv_heads)

  def one_chunk(i: jax.Array) -> jax.Array:
    start = i * chunk
    q_blk = jax.lax.dynamic_slice_in_dim(qg, start, chunk, axis=3)
    q_pos = start + jnp.arange(chunk, dtype=jnp.int32)
    # S = Q K^T
    scores = jnp.einsum("bhgqd,bhkd->bhgqk", q_blk, kh,
                        preferred_element_type=jnp.float32)
    logits, visible = masking.modify_and_mask(scores, config, masks, q_pos,
                                              k_pos, sq, sk)
    if bias is not None:
      logits = logits + _query_rows(bias, start, chunk).astype(jnp.float32)
    if mask is not None:
      visible = visible & _query_rows(mask, start, chunk)
    logits = jnp.where(visible, logits, -jnp.inf)
    m = layout.finite_or_zero(
        jax.lax.stop_gradient(jnp.max(logits, axis=-1)))
    p = jnp.exp(logits - m[..., None])
    inv_l, _ = layout.safe_log_normalizer(m, jnp.sum(p, axis=-1))
    if config.dropout_rate > 0:
      keep = masking.dropout_keep(masks.dropout_seed, config.dropout_rate,
                                  heads, score_shape, q_pos, k_pos)
      p = jnp.where(keep, p / (1.0 - config.dropout_rate), 0.0)
    # O = P V / l
    out = jnp.einsum("bhgqk,bhkd->bhgqd", p.astype(v.dtype), vh,
                     preferred_element_type=jnp.float32)
    return (out * inv_l[..., None]).astype(q.dtype)

  chunks = jax.lax.map(jax.checkpoint(one_chunk),
                       jnp.arange(num_chunks, dtype=jnp.int32))
  # (n, B, Hkv, G, chunk, Dv) -> (B, Hkv, G, n * chunk, Dv)
  out = jnp.moveaxis(chunks, 0, 3).reshape(score_shape + (padded_sq, dv))
  return layout.ungroup_queries(out[:, :, :, :sq])


def _pad_queries(x: Optional[jax.Array], padded_sq: int
                 ) -> Optional[jax.Array]:
  """Pads the query axis (3) of a grouped pairwise array, unless it is 1."""
  if x is None or x.shape[3] == 1:
    return x
  return layout.pad_axis(x, 3, padded_sq)


def _query_rows(x: jax.Array, start: jax.Array, chunk: int) -> jax.Array:
  """Rows [start, start + chunk) of the query axis, or x if it broadcasts."""
  if x.shape[3] == 1:
    return x
  return jax.lax.dynamic_slice_in_dim(x, start, chunk, axis=3)


def _grouped(x: Optional[jax.Array], heads: int, kv_heads: int
             ) -> Optional[jax.Array]:
  """A (B|1, H|1, Sq|1, Sk|1) array as (B|1, Hkv|1, G|1, Sq|1, Sk|1)."""
  if x is None:
    return None
  b, h, q, k = x.shape
  if h == 1:
    return x.reshape(b, 1, 1, q, k)
  return x.reshape(b, kv_heads, heads // kv_heads, q, k)
