"""ring_attention over a sequence split across 2, 4 and 8 host devices."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

import jax_flash
from conftest import max_abs_err, random_qkv
from jax_flash.config import AttentionConfig, MaskArrays
from jax_flash.reference import reference_attention

shard_map = getattr(jax, "shard_map", None)
if shard_map is None:
  from jax.experimental.shard_map import shard_map  # noqa: E402

SEQ = P(None, "ring")
ROWS = P(None, None, "ring")


def _mesh(n):
  if jax.device_count() < n:
    pytest.skip(f"needs {n} devices")
  return Mesh(np.array(jax.devices()[:n]), ("ring",))


def _inputs(seed, batch=2, length=64, heads=4, kv_heads=2, d=16):
  rng = np.random.default_rng(seed)
  q, k, v = random_qkv(seed, batch, length, length, heads, kv_heads, d)
  ids = jnp.asarray(np.sort(rng.integers(0, 3, (batch, length)), axis=1),
                    jnp.int32)
  slopes = jnp.asarray(rng.uniform(0.05, 0.5, (heads,)), jnp.float32)
  g_out = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
  g_lse = jnp.asarray(rng.standard_normal((batch, heads, length)),
                      jnp.float32)
  return q, k, v, ids, slopes, g_out, g_lse


def _sharded(n, load_balanced, options):
  """f(q, k, v, ids, slopes) -> (out, lse) in natural order, through the ring."""
  uses = dict(ids="segment_ids" in options, slopes="alibi_slopes" in options)
  options = {k: v for k, v in options.items()
             if k not in ("segment_ids", "alibi_slopes")}

  def body(q, k, v, ids, slopes):
    return jax_flash.ring_attention(
        q, k, v, axis_name="ring", load_balanced=load_balanced,
        return_lse=True, segment_ids=ids if uses["ids"] else None,
        alibi_slopes=slopes if uses["slopes"] else None, **options)

  ring = shard_map(body, mesh=_mesh(n), in_specs=(SEQ, SEQ, SEQ, SEQ, P()),
                   out_specs=(SEQ, ROWS))

  def f(q, k, v, ids, slopes):
    if not load_balanced:
      return ring(q, k, v, ids, slopes)
    balance = functools.partial(jax_flash.load_balance, num_shards=n)
    out, lse = ring(*map(balance, (q, k, v, ids)), slopes)
    return (jax_flash.unload_balance(out, n),
            jax_flash.unload_balance(lse, n, axis=2))
  return f


def _unsharded(options, implementation):
  def f(q, k, v, ids, slopes):
    options_ = dict(options)
    if "segment_ids" in options_:
      options_["segment_ids"] = ids
    if "alibi_slopes" in options_:
      options_["alibi_slopes"] = slopes
    return jax_flash.flash_attention(q, k, v, return_lse=True,
                                     implementation=implementation,
                                     **options_)
  return f


def _results(f, q, k, v, ids, slopes, g_out, g_lse):
  """(out, lse, dq, dk, dv, dslopes) for the loss <g_out, out> + <g_lse, lse>."""

  def loss(q, k, v, slopes):
    out, lse = f(q, k, v, ids, slopes)
    finite = jnp.where(jnp.isfinite(lse), lse, 0.0)
    return jnp.sum(out * g_out) + jnp.sum(finite * g_lse), (out, lse)

  grads, (out, lse) = jax.jit(jax.grad(loss, (0, 1, 2, 3), has_aux=True))(
      q, k, v, slopes)
  return (out, lse) + tuple(grads)


CASES = [
    # (n, load_balanced, implementation, options)
    (2, False, "xla", {}),
    (4, True, "xla", dict(causal=True)),
    (8, False, "xla", dict(causal=True)),
    (8, True, "reference", dict(causal=True, segment_ids=True)),
    (4, False, "reference", dict(causal=True, segment_ids=True,
                                 softcap=5.0)),
    (2, True, "xla", dict(causal=True, window_size=(9, 0))),
    (4, False, "xla", dict(window_size=(5, 3), alibi_slopes=True)),
    (8, True, "xla", dict(causal=True, alibi_slopes=True, segment_ids=True)),
    (4, True, "reference", dict(window_size=(20, 7), softmax_scale=0.3)),
]


@pytest.mark.parametrize("n,load_balanced,implementation,options", CASES,
                         ids=lambda c: str(c))
def test_matches_unsharded_attention(n, load_balanced, implementation,
                                     options):
  args = _inputs(n)
  got = _results(_sharded(n, load_balanced, dict(
      options, implementation=implementation)), *args)
  want = _results(_unsharded(options, "reference"), *args)
  names = ("out", "lse", "dq", "dk", "dv", "dslopes")
  for name, a, b in zip(names, got, want):
    if name == "dslopes" and "alibi_slopes" not in options:
      continue
    scale = max(1.0, float(jnp.max(jnp.abs(jnp.where(jnp.isfinite(b), b,
                                                       0.0)))))
    assert max_abs_err(a, b) <= 2e-5 * scale, name
