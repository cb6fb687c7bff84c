"""Helpers shared by the Flax layer tests."""

import jax
import numpy as np


def random_inputs(seed, shape):
  """Standard-normal float32 inputs of `shape`."""
  return jax.random.normal(jax.random.key(seed), shape)


def assert_close(actual, expected, atol=2e-5):
  """Every leaf of two pytrees agrees within atol (absolute and relative)."""
  jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, atol=atol,
                                                       rtol=atol),
               actual, expected)
