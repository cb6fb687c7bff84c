"""Comparing an attention implementation with the float32 reference."""

import jax
import jax.numpy as jnp
import numpy as np

from conftest import assert_within_rule
from jax_flash.config import AttentionConfig, MaskArrays
from jax_flash.reference import reference_attention

ATOL = {jnp.float32: 2e-5, jnp.bfloat16: 1e-3, jnp.float16: 1e-4}


def make_masks(rng, batch, sq, sk, heads, *, alibi=False, segments=False,
               lengths=False, dropout=False):
  """Random MaskArrays with the requested parts."""
  ids = lambda s: jnp.asarray(np.sort(rng.integers(0, 3, (batch, s)), axis=1),
                              jnp.int32)
  return MaskArrays(
      alibi_slopes=(jnp.asarray(rng.uniform(0.01, 0.5, (batch, heads)),
                                jnp.float32) if alibi else None),
      q_segment_ids=ids(sq) if segments else None,
      kv_segment_ids=ids(sk) if segments else None,
      q_lengths=(jnp.asarray(rng.integers(1, sq + 1, (batch,)), jnp.int32)
                 if lengths else None),
      kv_lengths=(jnp.asarray(rng.integers(1, sk + 1, (batch,)), jnp.int32)
                  if lengths else None),
      dropout_seed=(jnp.asarray(rng.integers(0, 2**32, (2,)), jnp.uint32)
                    if dropout else None))


def outputs_and_grads(attend, q, k, v, config, masks, g_out, g_lse):
  """(out, lse, dq, dk, dv, dalibi) for the loss <g_out, out> + <g_lse, lse>."""

  def loss(q, k, v, slopes):
    out, lse = attend(q, k, v, config, masks._replace(alibi_slopes=slopes))
    finite_lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
    return (jnp.sum(out.astype(jnp.float32) * g_out) +
            jnp.sum(finite_lse * g_lse)), (out, lse)

  argnums = (0, 1, 2, 3) if masks.alibi_slopes is not None else (0, 1, 2)
  grad_fn = jax.jit(jax.grad(loss, argnums=argnums, has_aux=True))
  grads, (out, lse) = grad_fn(q, k, v, masks.alibi_slopes)
  dalibi = grads[3] if len(grads) == 4 else None
  return (out, lse) + tuple(grads[:3]) + (dalibi,)


def check_against_reference(attend, q, k, v, config, masks, seed=0):
  """Asserts the rule for out, lse, dq, dk, dv (and dalibi) of `attend`."""
  rng = np.random.default_rng(seed)
  b, sq, h, _ = q.shape
  g_out = jnp.asarray(rng.standard_normal(q.shape[:3] + (v.shape[-1],)),
                      jnp.float32)
  g_lse = jnp.asarray(rng.standard_normal((b, h, sq)), jnp.float32)
  f32 = lambda x: x.astype(jnp.float32)
  exact = outputs_and_grads(reference_attention, f32(q), f32(k), f32(v),
                            config, masks, g_out, g_lse)
  lowp_ref = lambda *a: reference_attention(*a, upcast=False)
  lowp = outputs_and_grads(lowp_ref, q, k, v, config, masks, g_out, g_lse)
  got = outputs_and_grads(attend, q, k, v, config, masks, g_out, g_lse)
  atol = ATOL[jnp.dtype(q.dtype).type]
  for name, a, e, l in zip(("out", "lse", "dq", "dk", "dv", "dalibi"), got,
                           exact, lowp):
    if e is None:
      continue
    assert a.shape == e.shape, f"{name}: shape {a.shape} != {e.shape}"
    # Gradients scale with the problem; give them the atol per unit of size.
    scale = 1.0 if name in ("out", "lse") else max(
        1.0, float(jnp.max(jnp.abs(e))))
    assert_within_rule(name, a, e, l, atol * scale)
  out, lse = got[0], got[1]
  # Rows that see no key: out exactly 0, lse -inf, and that agrees with the
  # reference.
  empty = jnp.isneginf(exact[1])
  assert bool(jnp.all(jnp.isneginf(lse) == empty)), "lse -inf pattern differs"
  rows_out = jnp.moveaxis(out, 2, 1)  # (B, H, Sq, Dv)
  assert bool(jnp.all(jnp.where(empty[..., None], rows_out == 0, True)))
