"""The FFI custom calls of docs/ffi_contract.md, for already local shapes.

These functions only emit a custom call by name; the library is needed to
run the result, not to build it (except for the size of the backward's
scratch buffer, which only the library knows).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_flash.config import AttentionConfig
from jax_flash.cuda import library

MASK_OPERANDS = (("alibi_slopes", jnp.float32),
                 ("q_segment_ids", jnp.int32),
                 ("kv_segment_ids", jnp.int32),
                 ("q_lengths", jnp.int32),
                 ("kv_lengths", jnp.int32))
"""The optional operands, in contract order, with their dtypes."""


BACKWARD_EXTRA_OPERANDS = (("dlse", jnp.float32),)
"""Optional operands the backward takes after the masks: lse's cotangent."""


def _mask_operands(masks: Sequence[jax.Array], mask_names: tuple[str, ...],
                   operands=MASK_OPERANDS) -> list[jax.Array]:
  """Every optional operand: the given ones, an empty (0,) for the rest."""
  given = dict(zip(mask_names, masks))
  unknown = set(given) - {name for name, _ in operands}
  if unknown:
    raise ValueError(f"unexpected optional operands {sorted(unknown)}")
  return [given.get(name, jnp.zeros((0,), dtype)) for name, dtype in operands]


def _attributes(config: AttentionConfig, direction: str,
                q: jax.Array) -> dict[str, np.generic]:
  """The forward's FFI attributes, typed as the handlers decode them; the
  kernel arch is chosen for `direction` at q's dtype and head dim."""
  left, right = config.effective_window
  arch = library.kernel_arch(direction, library.DTYPE_NAMES[q.dtype],
                             q.shape[3])
  return dict(softmax_scale=np.float32(config.softmax_scale),
              window_left=np.int32(left), window_right=np.int32(right),
              softcap=np.float32(config.softcap),
              kernel_arch=np.int32(arch))


def forward_call(q: jax.Array, k: jax.Array, v: jax.Array,
                 *masks: jax.Array, config: AttentionConfig,
                 mask_names: tuple[str, ...]) -> tuple[jax.Array, jax.Array]:
  """`jax_flash_fwd`: (out (B, Sq, H, Dv), lse (B, H, Sq) f32)."""
  batch, sq, heads, _ = q.shape
  results = (jax.ShapeDtypeStruct(q.shape[:3] + v.shape[3:], q.dtype),
             jax.ShapeDtypeStruct((batch, heads, sq), jnp.float32))
  call = jax.ffi.ffi_call(library.FORWARD_TARGET, results)
  out, lse = call(q, k, v, *_mask_operands(masks, mask_names),
                  **_attributes(config, "fwd", q))
  return out, lse


def backward_call(q: jax.Array, k: jax.Array, v: jax.Array, out: jax.Array,
                  dout: jax.Array, lse: jax.Array, *masks: jax.Array,
                  config: AttentionConfig,
                  mask_names: tuple[str, ...]) -> tuple[jax.Array, ...]:
  """`jax_flash_bwd`: (dq, dk, dv), plus dalibi (B, H) with alibi slopes.

  `masks` may end with "dlse" (B, H, Sq) f32, the cotangent of lse.
  """
  batch, sq, heads, head_dim = q.shape
  _, sk, kv_heads, value_dim = v.shape
  has_alibi = "alibi_slopes" in mask_names
  workspace = library.bwd_workspace_bytes(batch, sq, sk, heads, kv_heads,
                                          head_dim, value_dim,
                                          config.deterministic)
  results = (jax.ShapeDtypeStruct(q.shape, q.dtype),
             jax.ShapeDtypeStruct(k.shape, k.dtype),
             jax.ShapeDtypeStruct(v.shape, v.dtype),
             jax.ShapeDtypeStruct((batch, heads) if has_alibi else (0,),
                                  jnp.float32),
             jax.ShapeDtypeStruct((workspace,), jnp.uint8))
  call = jax.ffi.ffi_call(library.BACKWARD_TARGET, results)
  optional = _mask_operands(masks, mask_names,
                            MASK_OPERANDS + BACKWARD_EXTRA_OPERANDS)
  dq, dk, dv, dalibi, _ = call(q, k, v, out, dout, lse, *optional,
                               deterministic=bool(config.deterministic),
                               **_attributes(config, "bwd", q))
  return (dq, dk, dv, dalibi) if has_alibi else (dq, dk, dv)
