"""jax_flash.flax.nnx.FlashMultiHeadAttention against Flax's NNX layer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flax_helpers import assert_close, random_inputs
from jax_flash.flax.nnx import FlashMultiHeadAttention

B, S, F, HEADS = 2, 19, 32, 4


def inputs(seed=0, shape=(B, S, F)):
  return random_inputs(seed, shape)


def pair(num_kv_heads=None, **kwargs):
  """Flax's layer and ours, built from the same seed."""
  return [cls(HEADS, F, num_kv_heads=num_kv_heads, decode=False,
              rngs=nnx.Rngs(0), **kwargs)
          for cls in (nnx.MultiHeadAttention, FlashMultiHeadAttention)]


@pytest.mark.parametrize("num_kv_heads,normalize_qk",
                         [(None, True), (2, False)])
def test_state_is_flax_state(num_kv_heads, normalize_qk):
  flax_layer, layer = pair(num_kv_heads, normalize_qk=normalize_qk)
  want, got = nnx.state(flax_layer, nnx.Param), nnx.state(layer, nnx.Param)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  assert_close(got, want, 0.0)


def test_flax_checkpoint_gives_flax_outputs_and_gradients():
  flax_layer, layer = pair(num_kv_heads=2)
  # Load the Flax layer's weights into ours, as from a checkpoint.
  nnx.update(layer, jax.tree.map(lambda p: p + 0.01,
                                 nnx.state(flax_layer, nnx.Param)))
  nnx.update(flax_layer, nnx.state(layer, nnx.Param))
  x = inputs()

  @nnx.jit
  def loss_and_grads(model, x):
    def loss(model):
      if isinstance(model, FlashMultiHeadAttention):
        out = model(x, causal=True)
      else:
        out = model(x, is_causal=True)
      return jnp.sum(jnp.sin(out))
    return nnx.value_and_grad(loss)(model)

  want = loss_and_grads(flax_layer, x)
  got = loss_and_grads(layer, x)
  assert_close(got[0], want[0], 1e-4)
  assert_close(nnx.state(got[1]), nnx.state(want[1]), 1e-4)


def test_segment_ids_match_flax_mask():
  flax_layer, layer = pair()
  x = inputs()
  ids = jnp.asarray(np.repeat([[0, 1], [4, 4]], [9, 10], axis=1))
  mask = nnx.make_attention_mask(ids, ids, jnp.equal)
  assert_close(layer(x, segment_ids=ids), flax_layer(x, mask=mask))


@pytest.mark.parametrize("chunks", [[1] * S, [4, 1, 14]])
def test_decode_matches_full_sequence(chunks):
  x = inputs()
  _, layer = pair(num_kv_heads=2)
  want = layer(x, causal=True)
  layer.init_cache((B, S, F))
  step = nnx.jit(lambda model, piece: model(piece, decode=True, causal=True))
  outs, start = [], 0
  for n in chunks:
    outs.append(step(layer, x[:, start:start + n]))
    start += n
  assert int(layer.cache_index[...]) == S
  assert_close(jnp.concatenate(outs, axis=1), want)


def test_decode_with_a_float32_cache_and_bfloat16_layer():
  layer = FlashMultiHeadAttention(HEADS, F, dtype=jnp.bfloat16, decode=True,
                                  rngs=nnx.Rngs(0))
  layer.init_cache((B, S, F))  # Flax's default cache dtype is float32
  out = layer(inputs(shape=(B, 1, F)))
  assert out.shape == (B, 1, F)


def test_decode_step_matches_flax_decode():
  flax_layer, layer = pair(num_kv_heads=2)
  x = inputs()
  for m in (flax_layer, layer):
    m.init_cache((B, S, F))

  @nnx.jit
  def step(model, token):
    return model(token, decode=True)

  for t in range(5):
    assert_close(step(layer, x[:, t:t + 1]), step(flax_layer, x[:, t:t + 1]))
  assert_close(nnx.state(layer, nnx.Cache), nnx.state(flax_layer, nnx.Cache))


def test_dropout_uses_the_layer_stream():
  _, layer = pair(dropout_rate=0.5)
  x = inputs()
  plain = layer(x, deterministic=True)
  first = layer(x, deterministic=False)
  second = layer(x, deterministic=False)
  assert float(jnp.max(jnp.abs(first - plain))) > 1e-2
  assert float(jnp.max(jnp.abs(second - first))) > 1e-2
  same = [layer(x, deterministic=False, rngs=nnx.Rngs(dropout=3))
          for _ in range(2)]
  assert_close(same[1], same[0], 0.0)


def test_attention_fn_cannot_be_replaced():
  with pytest.raises(TypeError, match="attention_fn"):
    FlashMultiHeadAttention(HEADS, F, attention_fn=nnx.dot_product_attention,
                            rngs=nnx.Rngs(0))


def test_paged_cache_decodes_like_the_contiguous_one():
  x = inputs()
  _, layer = pair(num_kv_heads=2)
  paged = FlashMultiHeadAttention(HEADS, F, num_kv_heads=2, decode=False,
                                  cache_block_size=16, rngs=nnx.Rngs(0))
  # Row r's blocks in reverse pool order, with a spare block.
  table = jnp.array([[3, 2], [1, 0]], jnp.int32)
  paged.init_cache((B, S, F), num_blocks=5, block_table=table)
  layer.init_cache((B, S, F))
  assert paged.cached_key[...].shape == (5, 16, 2, F // HEADS)
  step = nnx.jit(lambda model, piece: model(piece, decode=True, causal=True))
  start = 0
  for n in (4, 1, 14):
    assert_close(step(paged, x[:, start:start + n]),
                 step(layer, x[:, start:start + n]))
    start += n
  np.testing.assert_array_equal(paged.cache_index[...], [S, S])
  # Rows continue from their own lengths: row 1 goes back to position 3.
  want = paged(x, causal=True, decode=False)
  paged.cache_index[...] = jnp.array([S, 3])
  assert_close(step(paged, x[:, 3:4])[1], want[1, 3:4])
  with pytest.raises(ValueError, match="cache_block_size"):
    layer.init_cache((B, S, F), num_blocks=4)
