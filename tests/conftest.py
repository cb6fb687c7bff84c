"""Shared fixtures: 8 fake CPU devices, random inputs, FlashAttention's tolerance rule."""

import os

# Sharding tests need several devices; on CPU XLA fakes them. This must happen
# before JAX initializes its backends.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


def random_qkv(seed, batch, sq, sk, heads, kv_heads, d, dv=None,
               dtype=jnp.float32):
  """Fresh normal q (B,Sq,H,D), k (B,Sk,Hkv,D), v (B,Sk,Hkv,Dv)."""
  rng = np.random.default_rng(seed)
  dv = d if dv is None else dv
  make = lambda shape: jnp.asarray(rng.standard_normal(shape), dtype)
  return (make((batch, sq, heads, d)), make((batch, sk, kv_heads, d)),
          make((batch, sk, kv_heads, dv)))


def max_abs_err(a, b):
  """max |a - b| over finite entries; inf where exactly one side is non-finite."""
  a = jnp.asarray(a, jnp.float32)
  b = jnp.asarray(b, jnp.float32)
  same_inf = (a == b)
  diff = jnp.where(same_inf, 0.0, jnp.abs(a - b))
  return float(jnp.max(jnp.where(jnp.isnan(diff), jnp.inf, diff)))


def assert_within_rule(name, actual, exact, lowp, atol):
  """FlashAttention's rule: err(actual) <= 2 * err(low-precision reference) + atol."""
  err = max_abs_err(actual, exact)
  budget = 2 * max_abs_err(lowp, exact) + atol
  assert err <= budget, f"{name}: max error {err:.3g} exceeds {budget:.3g}"
  assert not bool(jnp.any(jnp.isnan(jnp.asarray(actual, jnp.float32)))), (
      f"{name} has NaN")


@pytest.fixture
def rng():
  return np.random.default_rng(1234)


@pytest.fixture
def float32_matmuls():
  """float32 products on every backend (a GPU would use TF32 by default),
  so that float32 tolerances hold wherever the suite runs."""
  with jax.default_matmul_precision("float32"):
    yield
