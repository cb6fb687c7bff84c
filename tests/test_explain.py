"""jax_flash.explain names the implementation a call runs, and why."""

import re

import jax
import jax.numpy as jnp
import pytest

import jax_flash
from jax_flash import dispatch

Q = jnp.zeros((2, 16, 4, 64), jnp.bfloat16)
KV = jnp.zeros((2, 16, 2, 64), jnp.bfloat16)
DROPOUT = dict(dropout_rate=0.1, dropout_rng=jax.random.key(0))


def test_covered_call_runs_the_kernels_exactly_when_they_are_available():
  explanation = jax_flash.explain(Q, KV, KV, causal=True, return_lse=True)
  assert explanation.cuda_covers_arguments
  unavailable = dispatch.cuda_unavailable_reason()
  if unavailable is None:
    assert explanation.implementation == "cuda"
  else:
    assert explanation == jax_flash.Explanation("xla", unavailable, True)


@pytest.mark.parametrize("q,kv,options,lacking", [
    (Q, KV, DROPOUT, "dropout_rate > 0"),
    (Q.astype(jnp.float32), KV.astype(jnp.float32), {}, "float32 inputs"),
])
def test_uncovered_arguments_are_named(q, kv, options, lacking):
  explanation = jax_flash.explain(q, kv, kv, **options)
  assert explanation.implementation == "xla"
  assert not explanation.cuda_covers_arguments
  assert lacking in explanation.reason


def test_cuda_request_raises_with_the_explained_reason():
  explanation = jax_flash.explain(Q, KV, KV, implementation="cuda", **DROPOUT)
  assert explanation.implementation == "xla"
  with pytest.raises(ValueError, match=re.escape(explanation.reason)):
    jax_flash.flash_attention(Q, KV, KV, implementation="cuda", **DROPOUT)


@pytest.mark.parametrize("implementation", ["xla", "reference"])
def test_an_explicit_choice_is_kept(implementation):
  explanation = jax_flash.explain(Q, KV, KV, implementation=implementation)
  assert explanation.implementation == implementation
  assert implementation in explanation.reason


def test_shapes_alone_suffice():
  q = jax.ShapeDtypeStruct(Q.shape, Q.dtype)
  kv = jax.ShapeDtypeStruct(KV.shape, KV.dtype)
  assert jax_flash.explain(q, kv, kv) == jax_flash.explain(Q, KV, KV)


def test_bad_arguments_raise_as_in_flash_attention():
  with pytest.raises(ValueError, match="multiple of"):
    jax_flash.explain(Q, Q[:, :, :3], Q[:, :, :3])
  with pytest.raises(ValueError, match="implementation must be one of"):
    jax_flash.explain(Q, KV, KV, implementation="triton")
