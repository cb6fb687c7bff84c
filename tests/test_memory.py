"""The blockwise path never materializes an Sq x Sk array (checked on the compiled program)."""

import jax
import jax.numpy as jnp
import pytest

import jax_flash


def temp_bytes(fn, s, heads=2, d=32):
  x = jax.ShapeDtypeStruct((1, s, heads, d), jnp.float32)
  return jax.jit(fn).lower(x, x, x).compile().memory_analysis().temp_size_in_bytes


def forward(q, k, v):
  return jax_flash.flash_attention(q, k, v, causal=True, implementation="xla")


def forward_backward(q, k, v):
  return jax.grad(lambda q, k, v: jnp.sum(forward(q, k, v)), (0, 1, 2))(q, k, v)


@pytest.mark.parametrize("fn", [forward, forward_backward], ids=["fwd", "fwd+bwd"])
def test_temporary_memory_grows_linearly(fn):
  small, large = temp_bytes(fn, 2048), temp_bytes(fn, 8192)
  # 4x the length: linear growth is about 4x (less, with fixed-size tiles),
  # quadratic would be 16x.
  assert large <= 5 * small, (small, large)
  # And far below one float32 score matrix of a single head.
  assert large < 8192 * 8192 * 4 / 8, large


def test_temporary_memory_far_below_dense_attention():
  dense = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True)
  assert temp_bytes(forward, 8192) * 10 < temp_bytes(dense, 8192)
