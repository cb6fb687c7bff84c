"""Blockwise forward: online softmax over key blocks, one query block at a time.

For each query block (a sequential `lax.map`, so only one block's temporaries
are live) a `fori_loop` walks the key blocks the masks leave visible, keeping
the running max m, running sum l and the unnormalized output in float32:

  S = Q K^T;  m' = max(m, rowmax(S));  P = exp(S - m')
  l' = exp(m - m') l + rowsum(P);  O' = exp(m - m') O + P V
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_flash import layout, masking
from jax_flash.blockwise.tiling import (Tiling, block_positions,
                                        key_block_range, tile_logits)
from jax_flash.config import AttentionConfig, MaskArrays


def _rows(x: jax.Array) -> jax.Array:
  """(B, S, Hkv, D) -> (B, S, Hkv * D)."""
  return x.reshape(x.shape[:2] + (-1,))


def blockwise_forward(q: jax.Array, k: jax.Array, v: jax.Array,
                      config: AttentionConfig, masks: MaskArrays,
                      tiling: Tiling) -> tuple[jax.Array, jax.Array]:
  """(out (B, Sq, H, Dv), lse (B, H, Sq) float32) without an Sq x Sk array."""
  batch, sq, heads, _ = q.shape
  kv_heads, dv = v.shape[2], v.shape[3]
  groups = heads // kv_heads
  bq, bk = tiling.block_q, tiling.block_k
  qg = layout.pad_axis(layout.group_queries(q, kv_heads), 3, tiling.padded_sq)
  # K/V stay sequence-major: each key block is sliced first and made
  # head-major after, so only the blocks the masks leave visible are moved
  # (a short query against a long cache never copies the whole cache).
  # Heads and features are merged into one axis around the loop: a GPU
  # compiler otherwise gives the whole array the head-major layout the
  # block's product wants, one transposed copy of a K/V cache per call.
  kp = _rows(layout.pad_axis(k, 1, tiling.padded_sk))
  vp = _rows(layout.pad_axis(v, 1, tiling.padded_sk))
  key_block = lambda x, j: layout.heads_major(
      jax.lax.dynamic_slice_in_dim(x, j * bk, bk, axis=1).reshape(
          (batch, bk, kv_heads, -1)))
  score_shape = (batch, kv_heads, groups)

  def one_query_block(i):
    q_blk = jax.lax.dynamic_slice_in_dim(qg, i * bq, bq, axis=3)
    q_pos = block_positions(i, bq)

    def visit_key_block(j, carry):
      m, l, acc = carry
      k_blk, v_blk = key_block(kp, j), key_block(vp, j)
      k_pos = block_positions(j, bk)
      # S = Q K^T, then the masks and score modifiers
      _, logits, visible = tile_logits(q_blk, k_blk, config, masks, q_pos,
                                       k_pos, tiling)
      logits = jnp.where(visible, logits, -jnp.inf)
      m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
      m_safe = layout.finite_or_zero(m_new)
      p = jnp.exp(logits - m_safe[..., None])
      rescale = jnp.exp(m - m_safe)
      l = rescale * l + jnp.sum(p, axis=-1)
      if config.dropout_rate > 0:
        keep = masking.dropout_keep(masks.dropout_seed, config.dropout_rate,
                                    heads, score_shape, q_pos, k_pos)
        p = jnp.where(keep, p * (1.0 / (1.0 - config.dropout_rate)), 0.0)
      # O += P V
      acc = rescale[..., None] * acc + jnp.einsum(
          "bhgqk,bhkd->bhgqd", p.astype(v.dtype), v_blk,
          preferred_element_type=jnp.float32)
      return m_new, l, acc

    zeros = lambda shape: layout.zeros_varying_like(shape, q, k, v, masks)
    init = (zeros(score_shape + (bq,)) - jnp.inf, zeros(score_shape + (bq,)),
            zeros(score_shape + (bq, dv)))
    first, end = key_block_range(tiling, config, masks, batch, i)
    m, l, acc = jax.lax.fori_loop(first, end, visit_key_block, init)
    inv_l, lse = layout.safe_log_normalizer(layout.finite_or_zero(m), l)
    return (acc * inv_l[..., None]).astype(q.dtype), lse

  out, lse = jax.lax.map(one_query_block,
                         jnp.arange(tiling.num_q_blocks, dtype=jnp.int32))
  # (nq, B, Hkv, G, bq, ...) -> (B, Hkv, G, nq * bq, ...)
  out = jnp.moveaxis(out, 0, 3).reshape(score_shape + (tiling.padded_sq, dv))
  lse = jnp.moveaxis(lse, 0, 3).reshape(score_shape + (tiling.padded_sq,))
  out = layout.ungroup_queries(out[:, :, :, :sq])
  lse = lse[..., :sq].reshape(batch, heads, sq)
  return out, lse
