"""merge_attention_states: attention over a union of key sets from its parts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flash
from conftest import max_abs_err, random_qkv


def _split_and_merge(q, k, v, cuts, **options):
  """flash_attention over each key chunk, merged; and over all keys."""
  bounds = [0, *cuts, k.shape[1]]
  outs, lses = [], []
  for lo, hi in zip(bounds[:-1], bounds[1:]):
    out, lse = jax_flash.flash_attention(
        q, k[:, lo:hi], v[:, lo:hi], return_lse=True,
        implementation="reference", **options)
    outs.append(out)
    lses.append(lse)
  return jax_flash.merge_attention_states(outs, lses)


@pytest.mark.parametrize("cuts", [(7,), (1, 40), (13, 14, 50)])
def test_merge_equals_attention_over_the_union(cuts):
  q, k, v = random_qkv(0, 2, 9, 61, 4, 2, 16)
  out, lse = _split_and_merge(q, k, v, cuts)
  want_out, want_lse = jax_flash.flash_attention(
      q, k, v, return_lse=True, implementation="reference")
  assert out.shape == want_out.shape and lse.shape == want_lse.shape
  assert max_abs_err(out, want_out) < 1e-5
  assert max_abs_err(lse, want_lse) < 1e-5


def test_stacked_parts_and_sequences_agree():
  q, k, v = random_qkv(1, 1, 5, 32, 2, 2, 8)
  halves = [jax_flash.flash_attention(q, k[:, s], v[:, s], return_lse=True,
                                      implementation="reference")
            for s in (slice(0, 16), slice(16, 32))]
  outs, lses = zip(*halves)
  a = jax_flash.merge_attention_states(list(outs), list(lses))
  b = jax_flash.merge_attention_states(jnp.stack(outs), jnp.stack(lses))
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])


def test_parts_that_saw_nothing():
  # Segment ids hide one chunk entirely from some rows and both from others.
  q, k, v = random_qkv(2, 1, 6, 8, 2, 1, 8)
  q_ids = jnp.array([[0, 0, 1, 1, 2, 2]])
  kv_ids = jnp.array([[0, 0, 0, 0, 1, 1, 1, 1]])
  outs, lses = [], []
  for s in (slice(0, 4), slice(4, 8)):
    out, lse = jax_flash.flash_attention(
        q, k[:, s], v[:, s], segment_ids=(q_ids, kv_ids[:, s]),
        return_lse=True, implementation="reference")
    outs.append(out.at[0, 4:].set(jnp.nan))   # rows no part sees: ignored
    lses.append(lse)
  out, lse = jax_flash.merge_attention_states(outs, lses)
  want_out, want_lse = jax_flash.flash_attention(
      q, k, v, segment_ids=(q_ids, kv_ids), return_lse=True,
      implementation="reference")
  assert max_abs_err(out, want_out) < 1e-5
  assert bool(jnp.all(jnp.isneginf(lse[0, :, 4:])))
  assert bool(jnp.all(out[0, 4:] == 0))
  np.testing.assert_allclose(lse[0, :, :4], want_lse[0, :, :4], atol=1e-5)


def test_gradients_match_attention_over_the_union():
  q, k, v = random_qkv(3, 1, 7, 24, 4, 2, 8)

  def merged(q, k, v):
    out, lse = _split_and_merge(q, k, v, (5, 17), softcap=2.0)
    return jnp.sum(jnp.sin(out)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0))

  def direct(q, k, v):
    out, lse = jax_flash.flash_attention(q, k, v, softcap=2.0,
                                         return_lse=True,
                                         implementation="reference")
    return jnp.sum(jnp.sin(out)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0))

  got = jax.grad(merged, argnums=(0, 1, 2))(q, k, v)
  want = jax.grad(direct, argnums=(0, 1, 2))(q, k, v)
  for name, g, w in zip("qkv", got, want):
    assert not bool(jnp.any(jnp.isnan(g))), name
    assert max_abs_err(g, w) < 1e-4, name


def test_output_dtype():
  q, k, v = random_qkv(4, 1, 3, 8, 2, 2, 8, dtype=jnp.bfloat16)
  out, lse = jax_flash.flash_attention(q, k, v, return_lse=True,
                                       implementation="reference")
  merged, merged_lse = jax_flash.merge_attention_states([out], [lse])
  assert merged.dtype == jnp.bfloat16 and merged_lse.dtype == jnp.float32
  as_f32, _ = jax_flash.merge_attention_states([out], [lse],
                                               out_dtype=jnp.float32)
  assert as_f32.dtype == jnp.float32


@pytest.mark.parametrize("outs_shape, lses_shape, match", [
    ((2, 1, 5, 3, 8), (2, 1, 5, 3), "do not match"),
    ((2, 1, 5, 3, 8), (3, 1, 3, 5), "do not match"),
    ((2, 5, 8), (2, 5), "parts of shape"),
])
def test_bad_shapes_name_both_arguments(outs_shape, lses_shape, match):
  with pytest.raises(ValueError, match=match):
    jax_flash.merge_attention_states(jnp.zeros(outs_shape),
                                     jnp.zeros(lses_shape))


def test_parts_of_different_shapes():
  with pytest.raises(ValueError, match="differ in shape"):
    jax_flash.merge_attention_states(
        [jnp.zeros((1, 2, 3, 4)), jnp.zeros((1, 3, 3, 4))],
        [jnp.zeros((1, 3, 2)), jnp.zeros((1, 3, 3))])
