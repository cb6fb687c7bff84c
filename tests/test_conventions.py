"""Each documented convention of flash_attention against a NumPy oracle.

The oracle builds the dense mask and bias from the docstring's words, so these
tests check the reference and the blockwise path against the contract rather
than against each other.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flash
from conftest import random_qkv

IMPLS = ["reference", "xla"]


def oracle(q, k, v, visible, bias=None, scale=None, softcap=None):
  """Dense float64 attention. visible/bias: (B, H, Sq, Sk)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  group = q.shape[2] // k.shape[2]
  k = np.repeat(k, group, axis=2)
  v = np.repeat(v, group, axis=2)
  scale = q.shape[-1]**-0.5 if scale is None else scale
  s = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
  if softcap:
    s = softcap * np.tanh(s / softcap)
  if bias is not None:
    s = s + bias
  s = np.where(visible, s, -np.inf)
  m = np.max(s, axis=-1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  p = np.exp(s - m)
  l = p.sum(-1, keepdims=True)
  out = np.einsum("bhqk,bkhd->bqhd", p / np.where(l == 0, 1, l), v)
  lse = np.where(l[..., 0] == 0, -np.inf, m[..., 0] + np.log(np.where(l == 0, 1, l))[..., 0])
  return out, lse


def distance(sq, sk, offset=None):
  """d[i, j] = i + offset - j, offset defaults to Sk - Sq."""
  offset = sk - sq if offset is None else offset
  return np.arange(sq)[:, None] + offset - np.arange(sk)[None, :]


def check(impl, q, k, v, visible, bias=None, **kwargs):
  out, lse = jax_flash.flash_attention(q, k, v, return_lse=True,
                                       implementation=impl, **kwargs)
  scale = kwargs.get("softmax_scale")
  want_out, want_lse = oracle(q, k, v, visible, bias, scale,
                              kwargs.get("softcap"))
  np.testing.assert_allclose(np.asarray(out), want_out, atol=2e-5, rtol=1e-4)
  np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse))
  np.testing.assert_allclose(np.where(np.isneginf(want_lse), 0, lse),
                             np.where(np.isneginf(want_lse), 0, want_lse),
                             atol=2e-5, rtol=1e-5)


def full(b, h, sq, sk):
  return np.ones((b, h, sq, sk), bool)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("sq,sk", [(5, 9), (9, 5), (6, 6)])
def test_causal_is_bottom_right(impl, sq, sk):
  q, k, v = random_qkv(0, 2, sq, sk, 4, 2, 16)
  visible = full(2, 4, sq, sk) & (distance(sq, sk) >= 0)
  check(impl, q, k, v, visible, causal=True)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("window,causal", [((2, 1), False), ((3, -1), False),
                                           ((-1, 2), False), ((4, 7), True)])
def test_window(impl, window, causal):
  sq, sk = 11, 14
  q, k, v = random_qkv(1, 1, sq, sk, 2, 1, 8)
  d = distance(sq, sk)
  left, right = window
  vis = np.ones_like(d, bool)
  if left >= 0:
    vis &= d <= left
  if right >= 0:
    vis &= -d <= right
  if causal:
    vis &= d >= 0
  check(impl, q, k, v, full(1, 2, sq, sk) & vis, window_size=window,
        causal=causal)


@pytest.mark.parametrize("impl", IMPLS)
def test_softcap_and_scale(impl):
  q, k, v = random_qkv(2, 2, 8, 10, 2, 2, 16)
  check(impl, 3 * q, k, v, full(2, 2, 8, 10), softcap=1.5, softmax_scale=0.7)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batched_slopes", [False, True])
def test_alibi(impl, batched_slopes):
  b, h, sq, sk = 2, 4, 6, 9
  q, k, v = random_qkv(3, b, sq, sk, h, 2, 8)
  slopes = np.random.default_rng(0).uniform(0.1, 1.0, (b, h) if batched_slopes else (h,))
  bias = -np.broadcast_to(slopes, (b, h))[:, :, None, None] * np.abs(distance(sq, sk))
  check(impl, q, k, v, full(b, h, sq, sk), bias,
        alibi_slopes=jnp.asarray(slopes, jnp.float32))


@pytest.mark.parametrize("impl", IMPLS)
def test_segment_ids_pair_and_single(impl):
  b, h, s = 2, 2, 12
  q, k, v = random_qkv(4, b, s, s, h, h, 8)
  ids = np.array([[0] * 5 + [1] * 7, [3] * 12])
  vis = (ids[:, :, None] == ids[:, None, :])[:, None]
  check(impl, q, k, v, np.broadcast_to(vis, (b, h, s, s)),
        segment_ids=jnp.asarray(ids))
  kv_ids = np.array([[0] * 3 + [1] * 9 + [2] * 4, [3] * 16])
  q, k, v = random_qkv(5, b, s, 16, h, h, 8)
  vis = (ids[:, :, None] == kv_ids[:, None, :])[:, None]
  check(impl, q, k, v, np.broadcast_to(vis, (b, h, s, 16)),
        segment_ids=(jnp.asarray(ids), jnp.asarray(kv_ids)))


@pytest.mark.parametrize("impl", IMPLS)
def test_lengths_with_causal(impl):
  b, h, sq, sk = 3, 2, 7, 10
  q, k, v = random_qkv(6, b, sq, sk, h, h, 8)
  q_len, kv_len = np.array([7, 3, 0]), np.array([10, 5, 4])
  vis = np.zeros((b, h, sq, sk), bool)
  for i in range(b):
    d = distance(sq, sk, kv_len[i] - q_len[i])
    vis[i] = ((np.arange(sq)[:, None] < q_len[i]) &
              (np.arange(sk)[None, :] < kv_len[i]) & (d >= 0))
  check(impl, q, k, v, vis, causal=True, q_seq_lengths=jnp.asarray(q_len),
        kv_seq_lengths=jnp.asarray(kv_len))


@pytest.mark.parametrize("impl", IMPLS)
def test_unbatched_inputs(impl):
  q, k, v = random_qkv(7, 1, 5, 8, 4, 2, 8)
  ids_q, ids_k = np.array([0, 0, 1, 1, 1]), np.array([0, 1, 1, 1, 1, 1, 1, 0])
  out = jax_flash.flash_attention(q[0], k[0], v[0], causal=True,
                                  segment_ids=(ids_q, ids_k), kv_seq_lengths=7,
                                  alibi_slopes=jnp.ones(4), implementation=impl)
  batched = jax_flash.flash_attention(q, k, v, causal=True,
                                      segment_ids=(ids_q[None], ids_k[None]),
                                      kv_seq_lengths=np.array([7]),
                                      alibi_slopes=jnp.ones((1, 4)),
                                      implementation=impl)
  assert out.shape == (5, 4, 8)
  np.testing.assert_allclose(out, batched[0], atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_fully_masked_rows_give_zero_and_no_nan(impl):
  q, k, v = random_qkv(8, 1, 4, 4, 2, 2, 8)
  ids = (jnp.array([[0, 0, 5, 5]]), jnp.array([[0, 1, 1, 1]]))

  def loss(q, k, v):
    out, lse = jax_flash.flash_attention(q, k, v, segment_ids=ids,
                                         return_lse=True, implementation=impl)
    return jnp.sum(out**2), (out, lse)

  (_, (out, lse)), grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v)
  assert np.all(np.asarray(out[0, 2:]) == 0)
  assert np.all(np.isneginf(np.asarray(lse[0, :, 2:])))
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g)))
  assert np.all(np.asarray(grads[0][0, 2:]) == 0)


@pytest.mark.parametrize("impl", IMPLS)
def test_q_rows_past_length_have_zero_gradient(impl):
  q, k, v = random_qkv(9, 2, 6, 6, 2, 2, 8)
  f = lambda q: jnp.sum(jax_flash.flash_attention(
      q, k, v, q_seq_lengths=jnp.array([4, 6]), implementation=impl)**2)
  dq = np.asarray(jax.grad(f)(q))
  assert np.all(dq[0, 4:] == 0) and np.any(dq[0, :4] != 0)


@pytest.mark.parametrize("impl", IMPLS)
def test_dropout_is_deterministic_and_unbiased(impl):
  q, k, v = random_qkv(10, 2, 64, 64, 4, 4, 16)
  key = jax.random.key(0)
  run = lambda key, rate: jax_flash.flash_attention(
      q, k, v, dropout_rate=rate, dropout_rng=key, implementation=impl)
  a, b = run(key, 0.3), run(key, 0.3)
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, run(jax.random.key(1), 0.3))
  assert not np.allclose(a, run(key, 0.0))
  # Dropout is unbiased: averaging over keys approaches the exact output.
  mean = jnp.mean(jnp.stack([run(jax.random.key(i), 0.3) for i in range(40)]), 0)
  exact = run(key, 0.0)
  assert float(jnp.mean(jnp.abs(mean - exact))) < 0.25 * float(jnp.mean(jnp.abs(exact)))


def test_dropout_keep_fraction_matches_rate():
  from jax_flash import masking
  keep = masking.dropout_keep(jnp.array([7, 9], jnp.uint32), 0.3, 4, (2, 2, 2),
                              jnp.arange(128), jnp.arange(256))
  assert abs(float(jnp.mean(keep)) - 0.7) < 0.01


def test_raw_uint32_key_accepted():
  q, k, v = random_qkv(11, 1, 8, 8, 2, 2, 8)
  out = jax_flash.flash_attention(q, k, v, dropout_rate=0.5,
                                  dropout_rng=jax.random.PRNGKey(3))
  assert out.shape == q.shape


def test_dtype_and_lse_dtype_preserved():
  for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
    q, k, v = random_qkv(12, 1, 8, 8, 2, 1, 8, 4, dtype)
    out, lse = jax_flash.flash_attention(q, k, v, return_lse=True)
    assert out.dtype == dtype and out.shape == (1, 8, 2, 4)
    assert lse.dtype == jnp.float32 and lse.shape == (1, 2, 8)
