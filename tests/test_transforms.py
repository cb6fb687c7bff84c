"""flash_attention under jit, grad, vmap, checkpoint, pmap, shard_map and sharded jit."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jax_flash
from conftest import random_qkv

pytestmark = pytest.mark.usefixtures("float32_matmuls")


attend = functools.partial(jax_flash.flash_attention, causal=True,
                           implementation="xla")
reference = functools.partial(jax_flash.flash_attention, causal=True,
                              implementation="reference")


def loss(fn, q, k, v):
  return jnp.sum(jnp.sin(fn(q, k, v)))


@pytest.mark.parametrize("in_axes", [0, (0, None, None), (1, 0, 2), (None, 2, 0)],
                         ids=str)
def test_vmap_any_in_axes(in_axes):
  q, k, v = random_qkv(0, 3, 9, 12, 4, 2, 16)
  axes = in_axes if isinstance(in_axes, tuple) else (in_axes,) * 3
  move = lambda x, a: x if a is None else jnp.moveaxis(
      jnp.stack([x, 2 * x, -x]), 0, a)
  qs, ks, vs = (move(x, a) for x, a in zip((q, k, v), axes))
  got = jax.jit(jax.vmap(attend, in_axes=in_axes))(qs, ks, vs)
  want = jax.vmap(reference, in_axes=in_axes)(qs, ks, vs)
  np.testing.assert_allclose(got, want, atol=2e-5)
  # vmap of grad and grad of vmap agree with the reference.
  g = jax.vmap(jax.grad(functools.partial(loss, attend), (0, 1, 2)),
               in_axes=in_axes)(qs, ks, vs)
  gr = jax.vmap(jax.grad(functools.partial(loss, reference), (0, 1, 2)),
                in_axes=in_axes)(qs, ks, vs)
  for a, b in zip(g, gr):
    np.testing.assert_allclose(a, b, atol=5e-5)


def test_vmap_over_unbatched_inputs_with_masks():
  q, k, v = random_qkv(1, 4, 6, 6, 2, 2, 8)
  lengths = jnp.array([1, 3, 6, 2])
  f = lambda q, k, v, n: jax_flash.flash_attention(
      q, k, v, kv_seq_lengths=n, implementation="xla")
  got = jax.vmap(f)(q, k, v, lengths)
  want = jax_flash.flash_attention(q, k, v, kv_seq_lengths=lengths,
                                   implementation="reference")
  np.testing.assert_allclose(got, want, atol=2e-5)


def test_checkpoint():
  q, k, v = random_qkv(2, 2, 17, 17, 2, 1, 8)
  f = jax.checkpoint(functools.partial(loss, attend))
  g = jax.jit(jax.grad(f, (0, 1, 2)))(q, k, v)
  gr = jax.grad(functools.partial(loss, reference), (0, 1, 2))(q, k, v)
  for a, b in zip(g, gr):
    np.testing.assert_allclose(a, b, atol=5e-5)


def test_pmap():
  n = jax.local_device_count()
  q, k, v = random_qkv(3, n, 10, 10, 2, 2, 8)
  split = lambda x: x.reshape(n, 1, *x.shape[1:])
  got = jax.pmap(jax.grad(functools.partial(loss, attend)))(
      split(q), split(k), split(v))
  want = jax.grad(functools.partial(loss, reference))(q, k, v)
  np.testing.assert_allclose(got.reshape(q.shape), want, atol=5e-5)


def _mesh():
  devices = np.array(jax.devices()[:8])
  if devices.size < 8:
    pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  return Mesh(devices.reshape(4, 2), ("data", "model"))


def test_shard_map():
  mesh = _mesh()
  q, k, v = random_qkv(4, 8, 16, 16, 4, 2, 8)
  spec = P("data", None, "model")
  f = jax.shard_map(jax.grad(functools.partial(loss, attend), (0, 1, 2)),
                    mesh=mesh, in_specs=(spec,) * 3, out_specs=(spec,) * 3)
  got = jax.jit(f)(q, k, v)
  want = jax.grad(functools.partial(loss, reference), (0, 1, 2))(q, k, v)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, atol=5e-5)


COLLECTIVES = re.compile(r"\b(all-gather|all-reduce|all-to-all|"
                         r"collective-permute|reduce-scatter)")


@pytest.mark.parametrize("spec", [P("data"), P("data", None, "model"),
                                  P(None, None, ("data", "model"))], ids=str)
def test_sharded_jit_adds_no_collective(spec):
  mesh = _mesh()
  q, k, v = random_qkv(5, 8, 32, 32, 8, 8, 16)
  sharding = NamedSharding(mesh, spec)
  q, k, v = (jax.device_put(x, sharding) for x in (q, k, v))
  fwd = jax.jit(attend, out_shardings=sharding)
  bwd = jax.jit(jax.grad(functools.partial(loss, attend), (0, 1, 2)),
                out_shardings=(sharding,) * 3)
  for fn in (fwd, bwd):
    hlo = fn.lower(q, k, v).compile().as_text()
    assert not COLLECTIVES.search(hlo), COLLECTIVES.findall(hlo)
  out = fwd(q, k, v)
  assert out.sharding.is_equivalent_to(sharding, out.ndim)
  np.testing.assert_allclose(out, reference(q, k, v), atol=2e-5)
