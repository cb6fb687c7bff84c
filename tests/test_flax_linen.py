"""jax_flash.flax.linen.FlashMultiHeadAttention against Flax's Linen layer."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_helpers import assert_close, random_inputs
from jax_flash.flax.linen import FlashMultiHeadAttention

B, S, F, HEADS = 2, 21, 32, 4


def inputs(seed=0, shape=(B, S, F)):
  return random_inputs(seed, shape)


@pytest.mark.parametrize("normalize_qk", [False, True])
def test_parameters_are_flax_parameters(normalize_qk):
  x = inputs()
  kwargs = dict(num_heads=HEADS, qkv_features=48, out_features=24,
                normalize_qk=normalize_qk)
  want = nn.MultiHeadDotProductAttention(**kwargs).init(jax.random.key(1), x)
  got = FlashMultiHeadAttention(**kwargs).init(jax.random.key(1), x)
  # Same tree, same shapes, and even the same initial values.
  assert jax.tree.structure(got) == jax.tree.structure(want)
  assert_close(got, want, 0.0)


def test_flax_checkpoint_gives_flax_outputs():
  x, y = inputs(), inputs(1, (B, 13, F))
  flax_layer = nn.MultiHeadDotProductAttention(num_heads=HEADS,
                                               qkv_features=F)
  params = flax_layer.init(jax.random.key(2), x)
  layer = FlashMultiHeadAttention(num_heads=HEADS, qkv_features=F)
  # Cross-attention, and causal self-attention against Flax's causal mask.
  assert_close(layer.apply(params, x, y), flax_layer.apply(params, x, y))
  causal = nn.make_causal_mask(jnp.ones((B, S)))
  assert_close(layer.apply(params, x, causal=True),
               flax_layer.apply(params, x, mask=causal))


def test_structured_masks_match_dense_masks():
  x = inputs()
  ids = jnp.asarray(np.repeat([[0, 1, 2], [5, 5, 6]], [7, 7, 7], axis=1))
  lengths = jnp.array([S, 15])
  layer = FlashMultiHeadAttention(num_heads=HEADS, qkv_features=F)
  params = layer.init(jax.random.key(3), x)
  pos = np.arange(S)
  cases = [
      (dict(segment_ids=ids, causal=True),
       nn.combine_masks(nn.make_attention_mask(ids, ids, jnp.equal),
                        nn.make_causal_mask(ids))),
      (dict(window_size=(3, 2)),  # keys j with -2 <= i - j <= 3
       jnp.asarray((pos[:, None] - pos[None, :] <= 3) &
                   (pos[None, :] - pos[:, None] <= 2))),
      (dict(kv_seq_lengths=lengths),
       nn.make_attention_mask(jnp.ones((B, S)), pos[None] < lengths[:, None])),
  ]

  @jax.jit
  def run(params, x):
    return [(layer.apply(params, x, **kwargs),
             layer.apply(params, x, mask=mask)) for kwargs, mask in cases]

  for fast, dense in run(params, x):
    assert_close(fast, dense)


def test_gqa_equals_repeated_kv_heads():
  x = inputs()
  layer = FlashMultiHeadAttention(num_heads=HEADS, qkv_features=F,
                                  num_kv_heads=2)
  params = layer.init(jax.random.key(4), x)
  assert params["params"]["key"]["kernel"].shape == (F, 2, F // HEADS)
  repeat = lambda p: jax.tree.map(lambda a: jnp.repeat(a, 2, axis=-2), p)
  flax_params = {"params": dict(params["params"],
                                key=repeat(params["params"]["key"]),
                                value=repeat(params["params"]["value"]))}
  want = nn.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=F).apply(
      flax_params, x, mask=nn.make_causal_mask(jnp.ones((B, S))))
  assert_close(layer.apply(params, x, causal=True), want)


@pytest.mark.parametrize("chunks", [[1] * S, [5, 1, 9, 6]])
def test_decode_matches_full_sequence(chunks):
  x = inputs()
  layer = FlashMultiHeadAttention(num_heads=HEADS, qkv_features=F,
                                  num_kv_heads=2)
  params = layer.init(jax.random.key(5), x)
  want = layer.apply(params, x, causal=True)

  decoder = FlashMultiHeadAttention(num_heads=HEADS, qkv_features=F,
                                    num_kv_heads=2, decode=True)
  cache = decoder.init(jax.random.key(0), x)["cache"]
  assert cache["cached_key"].shape == (B, S, 2, F // HEADS)

  @jax.jit
  def step(cache, piece):
    return decoder.apply({"params": params["params"], "cache": cache}, piece,
                         causal=True, mutable=["cache"])

  outs, start = [], 0
  for n in chunks:
    out, variables = step(cache, x[:, start:start + n])
    cache = variables["cache"]
    outs.append(out)
    start += n
  assert int(cache["cache_index"]) == S
  assert_close(jnp.concatenate(outs, axis=1), want)


def test_decode_step_matches_flax_decode():
  x = inputs()
  kwargs = dict(num_heads=HEADS, qkv_features=F, decode=True)
  flax_layer = nn.MultiHeadDotProductAttention(**kwargs)
  variables = flax_layer.init(jax.random.key(6), x)
  layer = FlashMultiHeadAttention(**kwargs)
  flax_vars = ours_vars = variables
  for t in range(4):
    want, flax_vars = flax_layer.apply(flax_vars, x[:, t:t + 1],
                                       mutable=["cache"])
    got, ours_vars = layer.apply(ours_vars, x[:, t:t + 1], mutable=["cache"])
    flax_vars = {"params": variables["params"], **flax_vars}
    ours_vars = {"params": variables["params"], **ours_vars}
    assert_close(got, want)
  assert_close(ours_vars["cache"], flax_vars["cache"])


def test_dropout():
  x = inputs()
  layer = FlashMultiHeadAttention(num_heads=HEADS, qkv_features=F,
                                  dropout_rate=0.5)
  params = layer.init(jax.random.key(7), x, deterministic=True)
  plain = layer.apply(params, x, deterministic=True)
  dropped = layer.apply(params, x, deterministic=False,
                        rngs={"dropout": jax.random.key(8)})
  explicit = [layer.apply(params, x, deterministic=False,
                          dropout_rng=jax.random.key(seed))
              for seed in (9, 9, 10)]
  assert float(jnp.max(jnp.abs(dropped - plain))) > 1e-2
  assert_close(explicit[1], explicit[0], 0.0)
  assert float(jnp.max(jnp.abs(explicit[2] - explicit[0]))) > 1e-2
  with pytest.raises(Exception, match="dropout"):
    layer.apply(params, x, deterministic=False)  # no rng


def test_sow_weights_is_an_error():
  x = inputs()
  layer = FlashMultiHeadAttention(num_heads=HEADS, qkv_features=F)
  params = layer.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="cannot sow"):
    layer.apply(params, x, sow_weights=True)


def test_paged_cache_decodes_the_full_sequence():
  x = inputs()
  kwargs = dict(num_heads=HEADS, qkv_features=F, num_kv_heads=2)
  params = FlashMultiHeadAttention(**kwargs).init(jax.random.key(5), x)
  want = FlashMultiHeadAttention(**kwargs).apply(params, x, causal=True)
  decoder = FlashMultiHeadAttention(**kwargs, decode=True,
                                    cache_block_size=16)
  cache = decoder.init(jax.random.key(0), x)["cache"]
  assert cache["cached_key"].shape == (B * 2, 16, 2, F // HEADS)
  assert cache["block_table"].shape == (B, 2)
  step = jax.jit(lambda cache, piece: decoder.apply(
      {"params": params["params"], "cache": cache}, piece, causal=True,
      mutable=["cache"]))
  outs, start = [], 0
  for n in (5, 1, 15):
    out, variables = step(cache, x[:, start:start + n])
    cache = variables["cache"]
    outs.append(out)
    start += n
  np.testing.assert_array_equal(cache["cache_index"], [S, S])
  assert_close(jnp.concatenate(outs, axis=1), want)
