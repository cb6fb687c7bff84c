"""The pure-JAX blockwise FlashAttention: O(S) memory on every backend."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jax_flash.blockwise.backward import blockwise_backward
from jax_flash.blockwise.forward import blockwise_forward
from jax_flash.blockwise.tiling import Tiling
from jax_flash.config import AttentionConfig, MaskArrays
from jax_flash.first_order import first_order_only

__all__ = ["blockwise_attention", "Tiling"]


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                        config: AttentionConfig, masks: MaskArrays, *,
                        block_q: int | None = None,
                        block_k: int | None = None
                        ) -> tuple[jax.Array, jax.Array]:
  """Blockwise attention with a recomputing backward.

  Args:
    q: (B, Sq, H, D); k: (B, Sk, Hkv, D); v: (B, Sk, Hkv, Dv).
    config: static options; masks: batched mask arrays.
    block_q, block_k: tile sizes (defaults in `tiling.py`).

  Returns:
    (out (B, Sq, H, Dv), lse (B, H, Sq) float32). Differentiable in q, k, v,
    the alibi slopes, and through lse as well as out.
  """
  tiling = Tiling.create(q.shape[1], k.shape[1], block_q, block_k)
  return _attention(q, k, v, masks, config, tiling)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention(q, k, v, masks, config, tiling):
  return blockwise_forward(q, k, v, config, masks, tiling)


def _attention_fwd(q, k, v, masks, config, tiling):
  out, lse = blockwise_forward(q, k, v, config, masks, tiling)
  return (out, lse), (q, k, v, masks, out, lse)


def _attention_bwd(config, tiling, residuals, cotangents):
  q, k, v, masks, out, lse = residuals
  dout, dlse = cotangents

  def gradients(q, k, v, out, lse, dout, dlse, masks):
    return blockwise_backward(q, k, v, out, lse, dout, dlse, config, masks,
                              tiling)

  dq, dk, dv, dalibi = first_order_only(gradients)(q, k, v, out, lse, dout,
                                                  dlse, masks)
  mask_grads = jax.tree_util.tree_map(lambda _: None, masks)
  mask_grads = mask_grads._replace(alibi_slopes=dalibi)
  return dq, dk, dv, mask_grads


_attention.defvjp(_attention_fwd, _attention_bwd)
