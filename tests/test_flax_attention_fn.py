"""jax_flash.flax.dot_product_attention against Flax's own attention.

Flax's layers are run twice from the same parameters, once with their default
`attention_fn` and once with ours; outputs and gradients must agree.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_flash.flax import dot_product_attention

B, S, F, HEADS = 2, 37, 32, 4
VALID = np.array([37, 20])  # right-padded lengths of the two sequences


def padding_mask():
  valid = np.arange(S)[None, :] < VALID[:, None]
  return nn.make_attention_mask(valid, valid)


MASKS = {
    "none": lambda: None,
    "causal": lambda: nn.make_causal_mask(jnp.ones((B, S))),
    "padding": padding_mask,
}


def valid_rows(mask_kind):
  """(B, S, 1) weights of the query rows Flax and jax_flash define alike.

  Flax averages all values for a query whose keys are all masked; jax_flash
  outputs zeros there. Only padded queries of the padding mask are such rows.
  """
  if mask_kind != "padding":
    return np.ones((B, S, 1), np.float32)
  return (np.arange(S)[None, :] < VALID[:, None])[..., None].astype(np.float32)


def assert_close(actual, expected, atol):
  jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, atol=atol,
                                                       rtol=atol),
               actual, expected)


def inputs(seed=0, shape=(B, S, F)):
  return jax.random.normal(jax.random.key(seed), shape)


@pytest.mark.parametrize("mask_kind", sorted(MASKS))
@pytest.mark.parametrize("dropout_rate", [0.0, 0.3])
def test_linen_layer_matches_flax(mask_kind, dropout_rate):
  mask = MASKS[mask_kind]()
  x = inputs()
  rows = valid_rows(mask_kind)
  cotangent = inputs(1) * rows

  def layer(attention_fn):
    # dropout_rate > 0 with deterministic=True takes Flax's non-fused path.
    return nn.MultiHeadDotProductAttention(
        num_heads=HEADS, qkv_features=F, dropout_rate=dropout_rate,
        deterministic=True, attention_fn=attention_fn)

  params = layer(nn.dot_product_attention).init(jax.random.key(2), x)

  def loss(attention_fn, params, x):
    out = layer(attention_fn).apply(params, x, mask=mask)
    return jnp.sum(out * cotangent), out

  grad = jax.jit(jax.grad(loss, argnums=(1, 2), has_aux=True),
                 static_argnums=0)
  (want_grads, want), (got_grads, got) = (
      grad(fn, params, x) for fn in (nn.dot_product_attention,
                                     dot_product_attention))
  assert_close(got * rows, want * rows, 2e-5)
  assert_close(got_grads, want_grads, 1e-4)


@pytest.mark.parametrize("mask_kind", ["none", "causal", "padding",
                                       "is_causal"])
def test_nnx_layer_matches_flax(mask_kind):
  mask = None if mask_kind == "is_causal" else MASKS[mask_kind]()
  x = inputs()
  rows = valid_rows(mask_kind)
  cotangent = inputs(1) * rows

  def loss(layer, x):
    out = layer(x, mask=mask, is_causal=mask_kind == "is_causal")
    return jnp.sum(out * cotangent), out

  results = []
  for fn in (nnx.dot_product_attention, dot_product_attention):
    # GQA: Flax's NNX layer has num_kv_heads; dropout in deterministic mode.
    layer = nnx.MultiHeadAttention(HEADS, F, num_kv_heads=2, decode=False,
                                   dropout_rate=0.3, deterministic=True,
                                   attention_fn=fn, rngs=nnx.Rngs(0))
    grads, out = nnx.jit(nnx.grad(loss, argnums=(0, 1), has_aux=True))(
        layer, x)
    results.append((out, grads))
  (want, want_grads), (got, got_grads) = results
  assert_close(got * rows, want * rows, 2e-5)
  assert_close(nnx.state(got_grads[0]), nnx.state(want_grads[0]), 1e-4)
  assert_close(got_grads[1], want_grads[1], 1e-4)


def random_qkv(seed, batch_shape, sq, sk, heads, kv_heads, d):
  ks = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(ks[0], batch_shape + (sq, heads, d)),
          jax.random.normal(ks[1], batch_shape + (sk, kv_heads, d)),
          jax.random.normal(ks[2], batch_shape + (sk, kv_heads, d)))


@pytest.mark.parametrize("sq,sk", [(7, 19), (19, 7), (12, 12)])
def test_is_causal_is_flax_top_left_mask(sq, sk):
  q, k, v = random_qkv(3, (2,), sq, sk, 4, 2, 16)
  # A different mask per query head, with GQA (4 query heads, 2 K/V heads).
  mask = jax.random.bernoulli(jax.random.key(4), 0.8, (2, 4, sq, sk))
  mask = mask.at[..., 0].set(True)  # no query without keys

  @functools.partial(jax.jit, static_argnums=0)
  def both(fn, q, k, v, mask):
    # Without a mask (fast path) and with one (dense path).
    return (fn(q, k, v, is_causal=True),
            fn(q, k, v, mask=mask, is_causal=True))

  assert_close(both(dot_product_attention, q, k, v, mask),
               both(nnx.dot_product_attention, q, k, v, mask), 2e-5)


@pytest.mark.parametrize("batch_shape", [(), (2, 3)])
def test_bias_mask_and_batch_dims(batch_shape):
  q, k, v = random_qkv(5, batch_shape, 9, 13, 2, 2, 8)
  ks = jax.random.split(jax.random.key(6), 2)
  bias = jax.random.normal(ks[0], (2, 9, 13))  # broadcast over batch
  mask = jax.random.bernoulli(ks[1], 0.7, batch_shape + (1, 9, 13))
  mask = mask.at[..., 0].set(True)

  def loss(fn, q, k, v, bias):
    out = fn(q, k, v, bias=bias, mask=mask)
    return jnp.sum(jnp.sin(out)), out

  grad = jax.jit(jax.grad(loss, argnums=(1, 2, 3, 4), has_aux=True),
                 static_argnums=0)
  want_grads, want = grad(nn.dot_product_attention, q, k, v, bias)
  got_grads, got = grad(dot_product_attention, q, k, v, bias)
  assert got.shape == batch_shape + (9, 2, 8)
  assert_close(got, want, 2e-5)
  assert_close(got_grads, want_grads, 1e-4)


def test_dtype_argument_promotes():
  q, k, v = random_qkv(7, (2,), 5, 5, 2, 2, 8)
  got = dot_product_attention(q, k, v, dtype=jnp.bfloat16)
  assert got.dtype == jnp.bfloat16
  want = nn.dot_product_attention(q, k, v)
  np.testing.assert_allclose(got.astype(jnp.float32), want, atol=5e-2)


def test_dropout_same_mask_on_fast_and_dense_paths():
  q, k, v = random_qkv(8, (2,), 33, 33, 2, 1, 8)
  rng = jax.random.key(9)
  all_visible = jnp.ones((1, 1, 33, 33), bool)

  @jax.jit
  def run(q, k, v, rng):
    return (dot_product_attention(q, k, v, dropout_rate=0.4, dropout_rng=rng),
            dot_product_attention(q, k, v, mask=all_visible, dropout_rate=0.4,
                                  dropout_rng=rng),
            dot_product_attention(q, k, v),
            # deterministic=True switches dropout off, as in Flax.
            dot_product_attention(q, k, v, dropout_rate=0.4, dropout_rng=rng,
                                  deterministic=True))

  fast, dense, no_dropout, off = run(q, k, v, rng)
  assert_close(dense, fast, 2e-5)
  assert float(jnp.max(jnp.abs(fast - no_dropout))) > 0.1
  assert_close(off, no_dropout, 0.0)


def test_dense_mask_never_builds_the_score_matrix():
  s = 2048
  q, k, v = random_qkv(10, (1,), s, s, 1, 1, 16)
  mask = jnp.ones((1, 1, s, s), bool)
  score_bytes = s * s * 4

  def temp_bytes(fn):
    loss = lambda q, k, v, mask: jnp.sum(fn(q, k, v, mask=mask))
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(
        q, k, v, mask).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  # The measurement sees Flax's (S, S) float32 scores ...
  assert temp_bytes(nn.dot_product_attention) >= score_bytes
  # ... and ours stays well below a single one.
  assert temp_bytes(dot_product_attention) < score_bytes / 2


def test_sowing_weights_is_an_error():
  layer = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8,
                                          attention_fn=dot_product_attention)
  x = inputs(shape=(1, 4, 8))
  params = layer.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="cannot sow"):
    layer.apply(params, x, sow_weights=True, mutable=["intermediates"])


def test_custom_einsum_is_an_error():
  q, k, v = random_qkv(11, (1,), 4, 4, 2, 2, 8)
  with pytest.raises(ValueError, match="qk_attn_weights_einsum"):
    dot_product_attention(q, k, v, qk_attn_weights_einsum=jnp.einsum,
                          attn_weights_value_einsum=jnp.einsum)


def test_unknown_keywords_pass_only_when_off():
  q, k, v = random_qkv(12, (1,), 4, 4, 2, 2, 8)
  want = dot_product_attention(q, k, v)
  assert_close(dot_product_attention(q, k, v, some_new_option=None), want, 0.0)
  with pytest.raises(ValueError, match="some_new_option"):
    dot_product_attention(q, k, v, some_new_option=True)


def test_linen_passes_only_known_keywords():
  # Linen filters the keywords it passes by our signature: those that can
  # change the result must be in it so that they are checked, not dropped.
  import inspect
  params = inspect.signature(dot_product_attention).parameters
  for name in ("bias", "mask", "broadcast_dropout", "dropout_rng",
               "dropout_rate", "deterministic", "dtype", "precision",
               "module", "force_fp32_for_softmax", "einsum_dot_general",
               "qk_attn_weights_einsum", "attn_weights_value_einsum",
               "promote_dtype", "is_causal"):
    assert name in params, name


def test_partial_is_causal_keeps_linen_on_the_fast_path():
  x = inputs()
  flax_layer = nn.MultiHeadDotProductAttention(num_heads=HEADS,
                                               qkv_features=F)
  fast_layer = nn.MultiHeadDotProductAttention(
      num_heads=HEADS, qkv_features=F,
      attention_fn=functools.partial(dot_product_attention, is_causal=True))
  params = flax_layer.init(jax.random.key(0), x)
  want = flax_layer.apply(params, x, mask=MASKS["causal"]())
  assert_close(fast_layer.apply(params, x), want, 2e-5)


def test_flax_decode_with_our_attention_fn():
  # Flax's own cache passes a dense mask of the filled positions.
  x = inputs(shape=(B, 6, F))
  layers = [nnx.MultiHeadAttention(HEADS, F, decode=True, attention_fn=fn,
                                   rngs=nnx.Rngs(0))
            for fn in (nnx.dot_product_attention, dot_product_attention)]
  for layer in layers:
    layer.init_cache(x.shape)
  step = nnx.jit(lambda layer, token: layer(token))
  for t in range(x.shape[1]):
    want, got = (step(layer, x[:, t:t + 1]) for layer in layers)
    assert_close(got, want, 2e-5)
