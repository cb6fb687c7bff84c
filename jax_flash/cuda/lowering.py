"""The FFI custom calls of docs/ffi_contract.md, for already local shapes.

`FORWARD`, `BACKWARD` and `DECODE` list each call's operands, results and
attributes in the order of its handler's `Bind()` chain (csrc/ffi/ffi_fwd.cu,
ffi_bwd.cu, ffi_decode.cu);
calls are made through them, by name, and tests/test_cuda_structure.py reads
the chains and docs/ffi_contract.md and checks that all three agree.

These functions only emit a custom call by name; the library is needed to
run the result, not to build it (except for the size of the backward's
scratch buffer, which only the library knows).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_flash import masking
from jax_flash.config import AttentionConfig, MaskArrays
from jax_flash.cuda import library

MASK_OPERANDS = (("alibi_slopes", jnp.float32),
                 ("q_segment_ids", jnp.int32),
                 ("kv_segment_ids", jnp.int32),
                 ("q_lengths", jnp.int32),
                 ("kv_lengths", jnp.int32),
                 ("position_offsets", jnp.int32))
"""The optional mask operands, in contract order, with their dtypes.
`position_offsets` (B,) is q_offset - kv_offset of `MaskArrays`, per batch
row (so that a vmapped axis folds into the batch like every other operand)."""


@dataclasses.dataclass(frozen=True)
class CustomCall:
  """One FFI custom call, named in the order of its handler's Bind() chain.

  Attributes:
    target: the registered name.
    operands: the operands every call passes.
    optional: (name, dtype) of the operands that follow them, each passed as
      an empty (0,) array when absent.
    results: the results.
    attributes: the attributes.
    vmap_method: how `jax.ffi.ffi_call` batches a vmapped call; None for
      calls only made under primitives whose batching rules fold vmapped
      axes into the batch.
  """

  target: str
  operands: tuple[str, ...]
  optional: tuple[tuple[str, Any], ...]
  results: tuple[str, ...]
  attributes: tuple[str, ...]
  vmap_method: Optional[str] = None

  def __call__(self, results: Sequence[jax.ShapeDtypeStruct],
               operands: Sequence[jax.Array],
               optional: Mapping[str, jax.Array],
               attributes: Mapping[str, Any]) -> Sequence[jax.Array]:
    """Emits the call; `optional` holds the optional operands given."""
    unknown = set(optional) - {name for name, _ in self.optional}
    if (len(operands) != len(self.operands) or unknown or
        len(results) != len(self.results) or
        set(attributes) != set(self.attributes)):
      raise ValueError(
          f"{self.target}: operands {len(operands)} of {self.operands}, "
          f"optional {sorted(optional)} of {self.optional}, "
          f"{len(results)} results of {self.results}, attributes "
          f"{sorted(attributes)} of {self.attributes}")
    call = jax.ffi.ffi_call(self.target, tuple(results),
                            vmap_method=self.vmap_method)
    return call(*operands,
                *(optional[name] if name in optional
                  else jnp.zeros((0,), dtype) for name, dtype in self.optional),
                **{name: attributes[name] for name in self.attributes})


_ATTRIBUTES = ("softmax_scale", "window_left", "window_right", "softcap",
               "kernel_arch")

FORWARD = CustomCall(
    library.FORWARD_TARGET, operands=("q", "k", "v"), optional=MASK_OPERANDS,
    results=("out", "lse", "workspace"), attributes=_ATTRIBUTES)

BACKWARD = CustomCall(
    library.BACKWARD_TARGET,
    operands=("q", "k", "v", "out", "dout", "lse"),
    # After the masks: lse's cotangent.
    optional=MASK_OPERANDS + (("dlse", jnp.float32),),
    results=("dq", "dk", "dv", "dalibi", "workspace"),
    attributes=_ATTRIBUTES + ("deterministic",))


DECODE = CustomCall(
    library.DECODE_TARGET,
    operands=("q", "k_cache", "v_cache", "seq_lengths"),
    optional=(("block_table", jnp.int32), ("alibi_slopes", jnp.float32)),
    results=("out", "lse", "workspace"),
    attributes=("softmax_scale", "window_left", "window_right", "softcap"),
    # Made under the decoding primitive (decode_primitive.py), whose
    # batching rule folds vmapped axes into one call; a direct vmapped call
    # would run one call per element.
    vmap_method="sequential")


def position_offsets(masks: MaskArrays, batch: int) -> Optional[jax.Array]:
  """(batch,) int32 q_offset - kv_offset (`masking.position_shift` for
  every row), or None when neither is given."""
  shift = masking.position_shift(masks)
  if shift is None:
    return None
  if shift.ndim:
    raise ValueError("q_offset and kv_offset must be scalars; got shape "
                     f"{shift.shape}")
  return jnp.broadcast_to(shift, (batch,))


def given_masks(masks: MaskArrays, batch: int
                ) -> tuple[list[jax.Array], tuple[str, ...]]:
  """The mask operands that are present (in contract order), and their
  names, for a call of `batch` rows."""
  operand = lambda name: (position_offsets(masks, batch)
                          if name == "position_offsets"
                          else getattr(masks, name))
  given = {name: operand(name) for name, _ in MASK_OPERANDS}
  names = tuple(name for name in given if given[name] is not None)
  return [given[name] for name in names], names


def _attributes(config: AttentionConfig, direction: str,
                q: jax.Array) -> dict[str, np.generic]:
  """The attributes both calls share, typed as the handlers decode them;
  the kernel arch is chosen for `direction` at q's dtype and head dim."""
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
  """`jax_flash_fwd`: (out (B, Sq, H, Dv), lse (B, H, Sq) f32).

  Short queries go to `jax_flash_decode` instead where it covers the call
  (`decode.covers`): K/V are then read once for every query head sharing
  them, split over the SMs along the keys.
  """
  from jax_flash.cuda import decode  # pylint: disable=import-outside-toplevel
  batch, sq, heads, _ = q.shape
  if decode.covers(q, k, v, mask_names):
    given = dict(zip(mask_names, masks))
    lengths = given.get("kv_lengths")
    if lengths is None:
      lengths = jnp.full((batch,), k.shape[1], jnp.int32)
    return decode.decode_call(q, k, v, lengths, config=config,
                              alibi_slopes=given.get("alibi_slopes"))
  results = (jax.ShapeDtypeStruct(q.shape[:3] + v.shape[3:], q.dtype),
             jax.ShapeDtypeStruct((batch, heads, sq), jnp.float32),
             jax.ShapeDtypeStruct((library.fwd_workspace_bytes(),),
                                  jnp.uint8))
  out, lse, _ = FORWARD(results, (q, k, v), dict(zip(mask_names, masks)),
                        _attributes(config, "fwd", q))
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
  attributes = _attributes(config, "bwd", q)
  attributes["deterministic"] = bool(config.deterministic)
  dq, dk, dv, dalibi, _ = BACKWARD(results, (q, k, v, out, dout, lse),
                                   dict(zip(mask_names, masks)), attributes)
  return (dq, dk, dv, dalibi) if has_alibi else (dq, dk, dv)
