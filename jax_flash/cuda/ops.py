"""The differentiable CUDA attention, from the primitives.

Head dims are zero-padded to a compiled size (and Dv to D): zero columns of
q and k add nothing to q.k, zero columns of v give zero output columns that
are sliced off, and `softmax_scale` is explicit, so padding changes nothing.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero, custom_vjp_primal_tree_values

from jax_flash import layout
from jax_flash.config import AttentionConfig, MaskArrays
from jax_flash.cuda import library, lowering, primitives
from jax_flash.first_order import first_order_only


def kernel_head_dim(dtype: jnp.dtype, needed: int) -> Optional[int]:
  """The compiled head dim the kernels run head dims up to `needed` at."""
  return library.kernel_head_dim(library.DTYPE_NAMES[jnp.dtype(dtype)], needed)


def _padded_dim(dtype: jnp.dtype, needed: int) -> int:
  if jnp.dtype(dtype) not in library.DTYPE_NAMES:
    raise TypeError("jax_flash's CUDA kernels take bfloat16 or float16, got "
                    f"{jnp.dtype(dtype).name}")
  dim = kernel_head_dim(dtype, needed)
  if dim is None:
    raise NotImplementedError(
        f"jax_flash's CUDA kernels have no head dim >= {needed} for "
        f"{jnp.dtype(dtype).name} in this build")
  return dim


def _register_handlers() -> None:
  """Registers the FFI handlers when they can run here (once, at trace time).

  The dispatcher does it through `jax_flash.cuda.unavailable_reason`; this
  covers callers of these functions directly. Without the library or a
  CUDA backend (a CPU machine inspecting the lowering) it does nothing.
  """
  if library.load_error() is not None or jax.default_backend() != "gpu":
    return
  if "cuda" in jax.devices()[0].client.platform_version.lower():
    library.register_targets()


def attention_forward(q: jax.Array, k: jax.Array, v: jax.Array,
                      config: AttentionConfig, masks: MaskArrays
                      ) -> tuple[jax.Array, jax.Array]:
  """Forward kernel only: (out (B, Sq, H, Dv), lse (B, H, Sq) float32)."""
  _register_handlers()
  value_dim = v.shape[3]
  dim = _padded_dim(q.dtype, max(q.shape[3], value_dim))
  arrays, names = lowering.given_masks(masks, q.shape[0])
  out, lse = primitives.forward(
      *(layout.pad_axis(x, 3, dim) for x in (q, k, v)), arrays,
      config=config, mask_names=names)
  return out[..., :value_dim], lse


def _gradients(q: jax.Array, k: jax.Array, v: jax.Array, out: jax.Array,
               lse: jax.Array, dout: jax.Array, dlse: Optional[jax.Array],
               config: AttentionConfig, masks: MaskArrays
               ) -> tuple[jax.Array, jax.Array, jax.Array, Optional[jax.Array]]:
  """(dq, dk, dv, dalibi or None), with lse's cotangent dlse if not None.

  One backward call: dlse enters the kernel as an operand (it shifts each
  row's delta, dS = P * (dP - rowsum(dout * out) + dlse)).
  """
  _register_handlers()
  head_dim, value_dim = q.shape[3], v.shape[3]
  dim = _padded_dim(q.dtype, max(head_dim, value_dim))
  pad = lambda x: layout.pad_axis(x, 3, dim)
  arrays, names = lowering.given_masks(masks, q.shape[0])
  if dlse is not None:
    arrays.append(dlse.astype(jnp.float32))
    names += ("dlse",)
  grads = primitives.backward(pad(q), pad(k), pad(v), pad(out), pad(dout),
                              lse, arrays, config=config, mask_names=names)
  dq, dk, dv = grads[0], grads[1], grads[2]
  dalibi = grads[3] if len(grads) > 3 else None
  return (dq[..., :head_dim], dk[..., :head_dim], dv[..., :value_dim],
          dalibi)


def attention_backward(q: jax.Array, k: jax.Array, v: jax.Array,
                       out: jax.Array, lse: jax.Array, dout: jax.Array,
                       config: AttentionConfig, masks: MaskArrays,
                       dlse: Optional[jax.Array] = None
                       ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Backward kernel only: (dq, dk, dv) for the cotangents dout of out and
  dlse (B, H, Sq) of lse (None: zero), given the forward's out and lse."""
  dq, dk, dv, _ = _gradients(q, k, v, out, lse, dout, dlse, config, masks)
  return dq, dk, dv


def attention_gradients(q: jax.Array, k: jax.Array, v: jax.Array,
                        out: jax.Array, lse: jax.Array, dout: jax.Array,
                        config: AttentionConfig, masks: MaskArrays,
                        dlse: Optional[jax.Array] = None
                        ) -> tuple[jax.Array, jax.Array, jax.Array,
                                   Optional[jax.Array]]:
  """`attention_backward` plus dalibi (B, H) float32 (None without alibi
  slopes): the gradient of the slopes as given, before any broadcast."""
  return _gradients(q, k, v, out, lse, dout, dlse, config, masks)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def attention(q: jax.Array, k: jax.Array, v: jax.Array,
              config: AttentionConfig, masks: MaskArrays
              ) -> tuple[jax.Array, jax.Array]:
  """(out, lse), differentiable in q, k, v, alibi slopes, through both."""
  return attention_forward(q, k, v, config, masks)


def _attention_fwd(q, k, v, config, masks):
  q, k, v, masks = custom_vjp_primal_tree_values((q, k, v, masks))
  out, lse = attention_forward(q, k, v, config, masks)
  return (out, lse), (q, k, v, out, lse, masks)


def _attention_bwd(config, residuals, cotangents):
  q, k, v, out, lse, masks = residuals
  dout, dlse = cotangents
  if isinstance(dout, SymbolicZero):
    dout = jnp.zeros_like(out)
  if isinstance(dlse, SymbolicZero):
    dlse = None

  def gradients(q, k, v, out, lse, dout, dlse, masks):
    return _gradients(q, k, v, out, lse, dout, dlse, config, masks)

  dq, dk, dv, dalibi = first_order_only(gradients)(q, k, v, out, lse, dout,
                                                  dlse, masks)
  mask_grads = jax.tree_util.tree_map(lambda _: None, masks)
  return dq, dk, dv, mask_grads._replace(alibi_slopes=dalibi)


attention.defvjp(_attention_fwd, _attention_bwd, symbolic_zeros=True)
