"""ring_attention over a sequence split across 2, 4 and 8 host devices."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

import jax_flash
from conftest import max_abs_err, random_qkv
from jax_flash.blockwise import blockwise_attention
from jax_flash.config import AttentionConfig, MaskArrays
from jax_flash.reference import reference_attention

shard_map = getattr(jax, "shard_map", None)
if shard_map is None:
  from jax.experimental.shard_map import shard_map  # noqa: E402

SEQ = P(None, "ring")
ROWS = P(None, None, "ring")


def _mesh(n):
  if jax.device_count() < n:
    pytest.skip(f"needs {n} devices")
  return Mesh(np.array(jax.devices()[:n]), ("ring",))


def _inputs(seed, batch=2, length=64, heads=4, kv_heads=2, d=16):
  rng = np.random.default_rng(seed)
  q, k, v = random_qkv(seed, batch, length, length, heads, kv_heads, d)
  ids = jnp.asarray(np.sort(rng.integers(0, 3, (batch, length)), axis=1),
                    jnp.int32)
  slopes = jnp.asarray(rng.uniform(0.05, 0.5, (heads,)), jnp.float32)
  g_out = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
  g_lse = jnp.asarray(rng.standard_normal((batch, heads, length)),
                      jnp.float32)
  return q, k, v, ids, slopes, g_out, g_lse


def _ring(n, load_balanced, options):
  """f(q, k, v, ids, slopes) -> (out, lse) through the ring, in the order of
  the shards (the load-balanced one when load_balanced)."""
  uses = dict(ids="segment_ids" in options, slopes="alibi_slopes" in options)
  options = {k: v for k, v in options.items()
             if k not in ("segment_ids", "alibi_slopes")}

  def body(q, k, v, ids, slopes):
    return jax_flash.ring_attention(
        q, k, v, axis_name="ring", load_balanced=load_balanced,
        return_lse=True, segment_ids=ids if uses["ids"] else None,
        alibi_slopes=slopes if uses["slopes"] else None, **options)

  return shard_map(body, mesh=_mesh(n), in_specs=(SEQ, SEQ, SEQ, SEQ, P()),
                   out_specs=(SEQ, ROWS))


def _unsharded(options):
  def f(q, k, v, ids, slopes):
    options_ = dict(options)
    if "segment_ids" in options_:
      options_["segment_ids"] = ids
    if "alibi_slopes" in options_:
      options_["alibi_slopes"] = slopes
    return jax_flash.flash_attention(q, k, v, return_lse=True,
                                     implementation="reference", **options_)
  return f


def _loss_and_results(f, q, k, v, ids, slopes, g_out, g_lse):
  """The compiled (out, lse, dq, dk, dv, dslopes) of <g_out, out> + <g_lse,
  lse>, and the compiled program's text."""

  def loss(q, k, v, slopes):
    out, lse = f(q, k, v, ids, slopes)
    finite = jnp.where(jnp.isfinite(lse), lse, 0.0)
    return jnp.sum(out * g_out) + jnp.sum(finite * g_lse), (out, lse)

  compiled = jax.jit(jax.grad(loss, (0, 1, 2, 3), has_aux=True)).lower(
      q, k, v, slopes).compile()
  grads, (out, lse) = compiled(q, k, v, slopes)
  return (out, lse) + tuple(grads), compiled.as_text()


def _ring_results(n, load_balanced, options, args):
  """Results in natural order, and the program's text."""
  if not load_balanced:
    return _loss_and_results(_ring(n, False, options), *args)
  balance = functools.partial(jax_flash.load_balance, num_shards=n)
  q, k, v, ids, slopes, g_out, g_lse = args
  results, text = _loss_and_results(
      _ring(n, True, options), *map(balance, (q, k, v, ids)), slopes,
      balance(g_out), balance(g_lse, axis=2))
  out, lse, dq, dk, dv, dslopes = results
  unbalance = functools.partial(jax_flash.unload_balance, num_shards=n)
  return (unbalance(out), unbalance(lse, axis=2), unbalance(dq),
          unbalance(dk), unbalance(dv), dslopes), text


def assert_ring_only(text):
  """The program moves K/V by collective-permutes and never gathers."""
  assert "collective-permute" in text
  assert not re.search(r"all-gather|all-to-all", text), re.findall(
      r"all-gather|all-to-all", text)


CASES = [
    # (n, load_balanced, implementation, options)
    (2, False, "xla", {}),
    (4, True, "xla", dict(causal=True)),
    (8, False, "xla", dict(causal=True)),
    (8, True, "reference", dict(causal=True, segment_ids=True)),
    (4, False, "reference", dict(causal=True, segment_ids=True,
                                 softcap=5.0)),
    (2, True, "xla", dict(causal=True, window_size=(9, 0))),
    (4, False, "xla", dict(window_size=(5, 3), alibi_slopes=True)),
    (8, True, "xla", dict(causal=True, alibi_slopes=True, segment_ids=True)),
    (4, True, "reference", dict(window_size=(20, 7), softmax_scale=0.3)),
]


@pytest.mark.parametrize("n,load_balanced,implementation,options", CASES,
                         ids=lambda c: str(c))
def test_matches_unsharded_attention(n, load_balanced, implementation,
                                     options):
  args = _inputs(n)
  got, text = _ring_results(n, load_balanced, dict(
      options, implementation=implementation), args)
  want, _ = _loss_and_results(_unsharded(options), *args)
  names = ("out", "lse", "dq", "dk", "dv", "dslopes")
  for name, a, b in zip(names, got, want):
    if name == "dslopes" and "alibi_slopes" not in options:
      continue
    scale = max(1.0, float(jnp.max(jnp.abs(jnp.where(jnp.isfinite(b), b,
                                                       0.0)))))
    assert max_abs_err(a, b) <= 2e-5 * scale, name
  assert_ring_only(text)


def test_vmap_over_batch():
  n = 4
  q, k, v, ids, *_ = _inputs(5)

  def body(q, k, v):
    ring = functools.partial(jax_flash.ring_attention, axis_name="ring",
                             causal=True, implementation="xla")
    return jax.vmap(ring)(q, k, v)  # each call sees (S / n, H, D)

  forward = jax.jit(shard_map(body, mesh=_mesh(n), in_specs=(SEQ,) * 3,
                              out_specs=SEQ)).lower(q, k, v).compile()
  want = jax_flash.flash_attention(q, k, v, causal=True,
                                   implementation="reference")
  assert max_abs_err(forward(q, k, v), want) <= 2e-5
  assert_ring_only(forward.as_text())


@pytest.mark.parametrize("attend", [
    reference_attention,
    functools.partial(blockwise_attention, block_q=8, block_k=8)],
                         ids=["reference", "blockwise"])
def test_offsets_mask_a_block_as_part_of_the_whole(attend):
  """Blocks of a (48, 48) problem, each called with its global offsets and
  merged over key blocks, give the attention of the whole."""
  q, k, v = random_qkv(6, 2, 48, 48, 2, 2, 8)
  slopes = jnp.asarray([[0.3, 0.1], [0.2, 0.05]], jnp.float32)
  config = AttentionConfig(0.4, causal=True, window_left=13)
  masks = MaskArrays(alibi_slopes=slopes)
  size, blocks = 16, 3

  def one_pair(pair):
    i, j = pair // blocks, pair % blocks
    cut = lambda x, b: jax.lax.dynamic_slice_in_dim(x, b * size, size, 1)
    return attend(cut(q, i), cut(k, j), cut(v, j), config,
                  masks._replace(q_offset=i * size, kv_offset=j * size))

  outs, lses = jax.jit(lambda: jax.lax.map(one_pair, jnp.arange(9)))()
  merged = [jax_flash.merge_attention_states(outs[b * 3:b * 3 + 3],
                                             lses[b * 3:b * 3 + 3])
            for b in range(blocks)]
  want_out, want_lse = reference_attention(q, k, v, config, masks)
  assert max_abs_err(jnp.concatenate([m[0] for m in merged], 1),
                     want_out) <= 2e-5
  assert max_abs_err(jnp.concatenate([m[1] for m in merged], 2),
                     want_lse) <= 2e-5


def test_cuda_kernels_take_offsets():
  """Offsets are no reason to leave the kernels (the ring's window and alibi
  steps run on them); tests/test_cuda_kernels.py checks the values."""
  cuda = pytest.importorskip("jax_flash.cuda")
  q, k, v = random_qkv(7, 1, 8, 8, 2, 2, 64, dtype=jnp.bfloat16)
  reason = cuda.unsupported_reason(q, k, v, AttentionConfig(1.0),
                                   MaskArrays(q_offset=jnp.int32(8)))
  assert reason is None


def test_load_balance_round_trip_and_order():
  x = jnp.arange(2 * 16).reshape(2, 16)
  balanced = jax_flash.load_balance(x, 4)
  # 8 chunks of 2: shard i holds chunks i and 7 - i.
  np.testing.assert_array_equal(
      balanced[0], [0, 1, 14, 15, 2, 3, 12, 13, 4, 5, 10, 11, 6, 7, 8, 9])
  np.testing.assert_array_equal(jax_flash.unload_balance(balanced, 4), x)
  y = jnp.arange(24).reshape(2, 3, 4)
  np.testing.assert_array_equal(
      jax_flash.unload_balance(jax_flash.load_balance(y, 2, axis=-1), 2,
                               axis=2), y)


def test_lengths_that_do_not_split_are_rejected():
  x = jnp.zeros((2, 30, 4, 8))
  with pytest.raises(ValueError, match=r"load_balance: x of shape "
                     r"\(2, 30, 4, 8\).*divisible by 2 \* num_shards = 8"):
    jax_flash.load_balance(x, 4)
  with pytest.raises(ValueError, match="unload_balance.*divisible"):
    jax_flash.unload_balance(x, 8)
  q = jnp.zeros((1, 6, 2, 8))
  ring = lambda **kw: jax.jit(shard_map(
      lambda q, k: jax_flash.ring_attention(q, k, k, axis_name="ring", **kw),
      mesh=_mesh(2), in_specs=(SEQ, SEQ), out_specs=SEQ))
  with pytest.raises(ValueError, match=r"load_balanced=True\): query of "
                     r"shape \(1, 3, 2, 8\).*global length 6 must be "
                     r"divisible by 2 \* 2"):
    ring(load_balanced=True)(q, q)
  with pytest.raises(ValueError, match="same length"):
    ring()(q, jnp.zeros((1, 4, 2, 8)))
  # Everything else is checked as flash_attention checks it.
  with pytest.raises(ValueError, match="window_size"):
    ring(window_size=(1, 2, 3))(q, q)


def test_flash_attention_on_an_explicitly_sharded_sequence_runs_the_ring():
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices")
  mesh = jax.make_mesh((2, 4), ("data", "seq"),
                       axis_types=(jax.sharding.AxisType.Explicit,) * 2)
  q, k, v, ids, _, g_out, _ = _inputs(8)
  rows = jax.sharding.NamedSharding(mesh, P("data", "seq"))
  put = lambda x: jax.device_put(x, rows)

  def loss(attend, q, k, v, ids):
    out = attend(q, k, v, segment_ids=ids, causal=True)
    return jnp.sum(out * g_out), out

  def attend(q, k, v, **kw):
    return jax_flash.flash_attention(q, k, v, implementation="xla", **kw)

  compiled = jax.jit(jax.grad(functools.partial(loss, attend), (0, 1, 2),
                              has_aux=True)).lower(
      put(q), put(k), put(v), put(ids)).compile()
  grads, out = compiled(put(q), put(k), put(v), put(ids))
  assert_ring_only(compiled.as_text())
  assert out.sharding.spec[:2] == ("data", "seq")
  reference = functools.partial(jax_flash.flash_attention,
                                implementation="reference")
  want_grads, want = jax.grad(functools.partial(loss, reference), (0, 1, 2),
                              has_aux=True)(q, k, v, ids)
  for a, b in zip((out,) + tuple(grads), (want,) + tuple(want_grads)):
    assert max_abs_err(a, b) <= 2e-5 * max(1.0, float(jnp.max(jnp.abs(b))))


@pytest.mark.parametrize("options", [dict(causal=True),
                                     dict(window_size=(7, 2))], ids=str)
def test_ring_of_one_is_flash_attention(options):
  args = _inputs(9, length=32)
  got, text = _loss_and_results(_ring(1, True, dict(
      options, implementation="xla")), *args)
  want, _ = _loss_and_results(_unsharded(options), *args)
  for a, b in zip(got[:5], want[:5]):
    assert max_abs_err(a, b) <= 2e-5 * max(1.0, float(jnp.max(jnp.abs(b))))
  # No loop, no branch, no collective: one attention call and its backward.
  assert not re.search(r"collective|conditional", text)
