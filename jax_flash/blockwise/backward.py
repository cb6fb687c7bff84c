"""Blockwise backward: recompute the probabilities block by block.

One pass over key blocks (a `lax.scan`, whose outputs are that block's dK and
dV); inside it a `fori_loop` over the query blocks that can see the key block.
dQ is a float32 carry updated in place. With delta = rowsum(dO * O):

  P = exp(S - lse);  dV += P^T dO;  dP = dO V^T
  dS = P * (dP - delta);  dQ += dS K;  dK += dS^T Q
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from jax_flash import layout, masking
from jax_flash.blockwise.tiling import (Tiling, block_positions,
                                        query_block_range, tile_logits)
from jax_flash.config import AttentionConfig, MaskArrays


def blockwise_backward(
    q: jax.Array, k: jax.Array, v: jax.Array, out: jax.Array, lse: jax.Array,
    dout: jax.Array, dlse: jax.Array, config: AttentionConfig,
    masks: MaskArrays, tiling: Tiling
) -> tuple[jax.Array, jax.Array, jax.Array, Optional[jax.Array]]:
  """(dq, dk, dv, dalibi) for cotangents (dout, dlse); dalibi None w/o alibi.

  A cotangent on lse adds dlse * P to dS: it enters as delta - dlse.
  """
  batch, sq, heads, d = q.shape
  sk, kv_heads, dv = v.shape[1], v.shape[2], v.shape[3]
  groups = heads // kv_heads
  bq, bk = tiling.block_q, tiling.block_k
  score_shape = (batch, kv_heads, groups)
  has_alibi = masks.alibi_slopes is not None

  pad_q = lambda x: layout.pad_axis(layout.group_queries(x, kv_heads), 3,
                                    tiling.padded_sq)
  qg, dog = pad_q(q), pad_q(dout)
  delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
  delta = delta - dlse.astype(jnp.float32).transpose(0, 2, 1)
  delta = pad_q(delta[..., None])[..., 0]
  lse_g = layout.pad_axis(lse.reshape(score_shape + (sq,)), 3,
                          tiling.padded_sq)
  # Rows with nothing visible have lse = -inf and P = 0 there; 0 keeps the
  # exponent finite for them (every entry is masked anyway).
  lse_g = layout.finite_or_zero(lse_g)
  kh = layout.pad_axis(layout.heads_major(k), 2, tiling.padded_sk)
  vh = layout.pad_axis(layout.heads_major(v), 2, tiling.padded_sk)
  keep_scale = 1.0 / (1.0 - config.dropout_rate)
  zeros = lambda shape: layout.zeros_varying_like(shape, q, k, v, out, lse,
                                                  dout, dlse, masks)

  def one_key_block(carry, j):
    dq_acc, dalibi = carry
    k_blk = jax.lax.dynamic_slice_in_dim(kh, j * bk, bk, axis=2)
    v_blk = jax.lax.dynamic_slice_in_dim(vh, j * bk, bk, axis=2)
    k_pos = block_positions(j, bk)

    def visit_query_block(i, inner):
      dk_acc, dv_acc, dq_acc, dalibi = inner
      q_blk = jax.lax.dynamic_slice_in_dim(qg, i * bq, bq, axis=3)
      do_blk = jax.lax.dynamic_slice_in_dim(dog, i * bq, bq, axis=3)
      lse_blk = jax.lax.dynamic_slice_in_dim(lse_g, i * bq, bq, axis=3)
      delta_blk = jax.lax.dynamic_slice_in_dim(delta, i * bq, bq, axis=3)
      q_pos = block_positions(i, bq)
      # S = Q K^T, then P = exp(S - lse)
      s, logits, visible = tile_logits(q_blk, k_blk, config, masks, q_pos,
                                       k_pos, tiling)
      p = jnp.where(visible, jnp.exp(logits - lse_blk[..., None]), 0.0)
      # dP = dO V^T
      dp = jnp.einsum("bhgqd,bhkd->bhgqk", do_blk, v_blk,
                      preferred_element_type=jnp.float32)
      p_used = p
      if config.dropout_rate > 0:
        keep = masking.dropout_keep(masks.dropout_seed, config.dropout_rate,
                                    heads, score_shape, q_pos, k_pos)
        p_used = jnp.where(keep, p * keep_scale, 0.0)
        dp = jnp.where(keep, dp * keep_scale, 0.0)
      # dV += P^T dO
      dv_acc = dv_acc + jnp.einsum("bhgqk,bhgqd->bhkd",
                                   p_used.astype(v.dtype), do_blk,
                                   preferred_element_type=jnp.float32)
      ds = p * (dp - delta_blk[..., None])
      if has_alibi:
        dist = masking.alibi_distance(masks, batch, tiling.sq, tiling.sk,
                                      q_pos, k_pos)
        dalibi = dalibi - jnp.sum(ds * dist, axis=(-2, -1))
      ds = ds * masking.softcap_derivative(s, config) * config.softmax_scale
      ds_lo = ds.astype(q.dtype)
      # dQ += dS K
      dq_blk = jax.lax.dynamic_slice_in_dim(dq_acc, i * bq, bq, axis=3)
      dq_blk = dq_blk + jnp.einsum("bhgqk,bhkd->bhgqd", ds_lo, k_blk,
                                   preferred_element_type=jnp.float32)
      dq_acc = jax.lax.dynamic_update_slice_in_dim(dq_acc, dq_blk, i * bq,
                                                   axis=3)
      # dK += dS^T Q
      dk_acc = dk_acc + jnp.einsum("bhgqk,bhgqd->bhkd", ds_lo, q_blk,
                                   preferred_element_type=jnp.float32)
      return dk_acc, dv_acc, dq_acc, dalibi

    init = (zeros((batch, kv_heads, bk, d)), zeros((batch, kv_heads, bk, dv)),
            dq_acc, dalibi)
    first, end = query_block_range(tiling, config, masks, batch, j)
    dk_blk, dv_blk, dq_acc, dalibi = jax.lax.fori_loop(
        first, end, visit_query_block, init)
    return (dq_acc, dalibi), (dk_blk.astype(k.dtype), dv_blk.astype(v.dtype))

  init = (zeros(score_shape + (tiling.padded_sq, d)), zeros(score_shape))
  (dq, dalibi), (dk, dv_) = jax.lax.scan(
      one_key_block, init, jnp.arange(tiling.num_k_blocks, dtype=jnp.int32))
  dq = layout.ungroup_queries(dq[:, :, :, :sq]).astype(q.dtype)
  # (nk, B, Hkv, bk, D) -> (B, Sk, Hkv, D)
  unblock = lambda x: layout.seq_major(
      jnp.moveaxis(x, 0, 2).reshape(batch, kv_heads, tiling.padded_sk,
                                    x.shape[-1])[:, :, :sk])
  dalibi = dalibi.reshape(batch, heads) if has_alibi else None
  return dq, unblock(dk), unblock(dv_), dalibi
