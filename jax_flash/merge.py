"""Merging attention results computed over disjoint sets of keys.

Attention over keys K1 ∪ K2 is a weighted sum of the attention over K1 and
over K2: with per-row log-sum-exps lse1, lse2,

  lse = log(exp(lse1) + exp(lse2))
  out = exp(lse1 - lse) * out1 + exp(lse2 - lse) * out2

This is how split-KV decoding combines its partial results, and how ring
attention adds the keys of each device in turn; one function serves both.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp

from jax_flash import layout

ArrayOrSequence = Union[jax.Array, Sequence[jax.Array]]


def merge_attention_states(
    outs: ArrayOrSequence, lses: ArrayOrSequence, *,
    out_dtype: Optional[jnp.dtype] = None) -> tuple[jax.Array, jax.Array]:
  """The attention over a union of disjoint key sets, from each set's result.

  Letters: N parts, B batch, Sq query length, H heads, Dv value head dim.

  Args:
    outs: N outputs of attention over disjoint key sets, each (B, Sq, H, Dv)
      (or any leading dims in place of B, (Sq, H, Dv) without a batch):
      a sequence, or one array stacked on a new leading axis of size N.
    lses: the matching log-sum-exps, each (B, H, Sq) (natural log, as
      `flash_attention(..., return_lse=True)` returns them), as a sequence or
      stacked the same way. A row whose part saw no key has lse = -inf and
      contributes nothing, whatever its output holds.
    out_dtype: dtype of the merged output; defaults to that of `outs`.

  Returns:
    (out (B, Sq, H, Dv), lse (B, H, Sq) float32). The weights are computed in
    float32. A row that no part saw outputs 0 with lse = -inf, and no NaN
    appears in any gradient. Differentiable in every out and lse.

  Raises:
    ValueError: when the parts' counts or shapes do not match.
  """
  outs = _stack("outs", outs)
  lses = _stack("lses", lses)
  if outs.ndim < 4 or lses.ndim != outs.ndim - 1:
    raise ValueError(
        "merge_attention_states: outs must be parts of shape (..., Sq, H, "
        "Dv) and lses of shape (..., H, Sq); got outs "
        f"{tuple(outs.shape)} and lses {tuple(lses.shape)} (part axis first)")
  expected = outs.shape[:-3] + (outs.shape[-2], outs.shape[-3])
  if tuple(lses.shape) != tuple(expected):
    raise ValueError(
        f"merge_attention_states: lses of shape {tuple(lses.shape)} do not "
        f"match outs of shape {tuple(outs.shape)}: expected lses of shape "
        f"{tuple(expected)} (part axis first)")
  dtype = outs.dtype if out_dtype is None else jnp.dtype(out_dtype)
  lses = lses.astype(jnp.float32)
  # The merged result does not depend on the shift m: it only keeps exp()
  # in range, so no gradient flows through it.
  m = layout.finite_or_zero(jax.lax.stop_gradient(jnp.max(lses, axis=0)))
  weights = jnp.exp(lses - m)                      # (N, ..., H, Sq)
  inv_total, lse = layout.safe_log_normalizer(m, jnp.sum(weights, axis=0))
  weights = jnp.swapaxes(weights * inv_total, -1, -2)[..., None]
  # A part with weight 0 saw no key: whatever its output holds is ignored.
  terms = jnp.where(weights > 0, weights * outs.astype(jnp.float32), 0.0)
  out = jnp.sum(terms, axis=0)
  return out.astype(dtype), lse


def _stack(name: str, parts: ArrayOrSequence) -> jax.Array:
  """Parts stacked on a new leading axis (an array is taken as stacked)."""
  if isinstance(parts, (list, tuple)):
    if not parts:
      raise ValueError(f"merge_attention_states: {name} is empty")
    shapes = {tuple(p.shape) for p in parts}
    if len(shapes) != 1:
      raise ValueError(f"merge_attention_states: the {name} differ in shape: "
                       f"{[tuple(p.shape) for p in parts]}")
    return jnp.stack([jnp.asarray(p) for p in parts])
  parts = jnp.asarray(parts)
  if parts.ndim == 0 or parts.shape[0] == 0:
    raise ValueError(f"merge_attention_states: {name} of shape "
                     f"{tuple(parts.shape)} holds no part")
  return parts
