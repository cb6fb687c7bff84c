"""One term of a ring step, forward and backward, on the chosen implementation.

The forward of a term is any implementation's (out, lse) over the keys in
hand. Its backward needs the gradient of the whole attention, not of the
term's own softmax: with the global (out, lse) of the local queries,

  P = exp(S - lse);  dS = P * (dP - rowsum(dO * out) + dlse)

is exactly what the blockwise and CUDA backwards compute when handed the
global out and lse. The reference has no such backward; its term gradient
goes through the merge instead (see `_reference_backward`).
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from jax_flash import dispatch, layout
from jax_flash.blockwise import blockwise_attention
from jax_flash.blockwise.backward import blockwise_backward
from jax_flash.blockwise.tiling import Tiling
from jax_flash.config import AttentionConfig, MaskArrays
from jax_flash.reference import reference_attention

Gradients = tuple[jax.Array, jax.Array, jax.Array, Optional[jax.Array]]
Backward = Callable[..., Gradients]


def forward(implementation: Optional[str], q: jax.Array, k: jax.Array,
            v: jax.Array, config: AttentionConfig,
            masks: MaskArrays) -> tuple[jax.Array, jax.Array]:
  """(out, lse) of the queries q over the keys k, as `flash_attention`."""
  return dispatch.select(implementation, q, k, v, config, masks)(
      q, k, v, config, masks)


def backward(implementation: Optional[str], q: jax.Array, k: jax.Array,
             v: jax.Array, out: jax.Array, lse: jax.Array, dout: jax.Array,
             dlse: jax.Array, config: AttentionConfig,
             masks: MaskArrays) -> Gradients:
  """(dq, dk, dv, dalibi or None): this term's share of the gradients.

  out (B, Sq, H, Dv) and lse (B, H, Sq) are those of the whole attention of
  the queries q; dout and dlse their cotangents.
  """
  attend = dispatch.select(implementation, q, k, v, config, masks)
  return _backward_of(attend)(q, k, v, out, lse, dout, dlse, config, masks)


def _backward_of(attend: dispatch.Attend) -> Backward:
  if attend is blockwise_attention:
    return _blockwise_backward
  if attend is reference_attention:
    return _reference_backward
  return _cuda_backward


def _blockwise_backward(q, k, v, out, lse, dout, dlse, config, masks):
  tiling = Tiling.create(q.shape[1], k.shape[1])
  return blockwise_backward(q, k, v, out, lse, dout, dlse, config, masks,
                            tiling)


def _cuda_backward(q, k, v, out, lse, dout, dlse, config, masks):
  from jax_flash import cuda  # pylint: disable=import-outside-toplevel
  return cuda.attention_gradients(q, k, v, out, lse, dout, config, masks,
                                  dlse)


def _reference_backward(q, k, v, out, lse, dout, dlse, config, masks):
  """Through the merge: out = sum_t w_t out_t with w_t = exp(lse_t - lse)
  gives d out_t = w_t dout and d lse_t = w_t (dlse + rowsum(dout (out_t -
  out))), and autodiff of the reference does the rest."""

  def term(q, k, v, slopes):
    return reference_attention(q, k, v, config,
                               masks._replace(alibi_slopes=slopes))

  (out_t, lse_t), pullback = jax.vjp(term, q, k, v, masks.alibi_slopes)
  weight = jnp.where(jnp.isneginf(lse_t), 0.0,
                     jnp.exp(lse_t - layout.finite_or_zero(lse)))
  dout = dout.astype(jnp.float32)
  shift = jnp.sum(dout * (out_t.astype(jnp.float32) -
                          out.astype(jnp.float32)), axis=-1)
  dout_t = jnp.swapaxes(weight, 1, 2)[..., None] * dout
  dlse_t = weight * (dlse + jnp.swapaxes(shift, 1, 2))
  return pullback((dout_t.astype(out_t.dtype), dlse_t))
