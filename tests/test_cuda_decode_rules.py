"""The decoding primitive's batching and sharding rules, run on CPU.

The primitive gets a CPU lowering whose per-shard function is the reference
attention over the (gathered) cache, so XLA partitions and runs it on the 8
fake devices of conftest.py; what each shard saw is recorded. The CUDA
kernel itself is checked in tests/test_cuda_decode.py on a GPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jax_flash.config import AttentionConfig, MaskArrays
from jax_flash.cuda import decode_primitive
from jax_flash.decode.paged import over_cache
from jax_flash.reference import reference_attention

SEEN = []


def _reference_decode(q, k_cache, v_cache, kv_lengths, *optional, config,
                      mask_names):
  given = dict(zip(mask_names, optional))
  SEEN.append((q.shape, k_cache.shape))
  masks = MaskArrays(kv_lengths=kv_lengths,
                     alibi_slopes=given.get("alibi_slopes"))
  return over_cache(reference_attention)(q, k_cache, v_cache,
                                         given.get("block_table"), config,
                                         masks)


decode_primitive.register_lowering(_reference_decode, "cpu")



@pytest.fixture(autouse=True)
def _on_cpu():
  """Unplaced arrays and eager calls on the CPU devices (also where a GPU is
  the default backend), so that the CPU lowering above runs."""
  with jax.default_device(jax.devices("cpu")[0]):
    yield


CONFIG = AttentionConfig(softmax_scale=0.25, causal=True)
BATCH, SQ, HEADS, KV_HEADS, D, BLOCK, PER_ROW = 4, 2, 8, 4, 16, 8, 3


def _call(seed, paged, alibi=False, batch=BATCH):
  rng = np.random.default_rng(seed)
  normal = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  q = normal(batch, SQ, HEADS, D)
  lengths = jnp.asarray(rng.integers(SQ, BLOCK * PER_ROW + 1, batch),
                        jnp.int32)
  kwargs = {}
  if paged:
    num_blocks = batch * PER_ROW + 2
    k, v = normal(num_blocks, BLOCK, KV_HEADS, D), normal(num_blocks, BLOCK,
                                                          KV_HEADS, D)
    table = rng.permutation(num_blocks)[:batch * PER_ROW].reshape(batch,
                                                                  PER_ROW)
    table[0, -1] = num_blocks + 5   # out of range: an empty block
    kwargs["block_table"] = jnp.asarray(table, jnp.int32)
  else:
    k, v = normal(batch, BLOCK * PER_ROW, KV_HEADS, D), normal(
        batch, BLOCK * PER_ROW, KV_HEADS, D)
  if alibi:
    kwargs["alibi_slopes"] = jnp.asarray(rng.uniform(0.1, 0.5,
                                                     (batch, HEADS)),
                                         jnp.float32)
  return (q, k, v, lengths), kwargs


def _attend(q, k, v, lengths, **kwargs):
  return decode_primitive.decode_attention(q, k, v, lengths, config=CONFIG,
                                           **kwargs)


@pytest.mark.parametrize("paged", [False, True])
def test_sharded_over_batch_and_kv_heads_runs_locally(paged):
  mesh = jax.make_mesh((2, 4), ("data", "model"),
                       devices=jax.devices("cpu")[:8])
  (q, k, v, lengths), kwargs = _call(0, paged, alibi=True)
  want = _attend(q, k, v, lengths, **kwargs)
  put = lambda x, *spec: jax.device_put(x, NamedSharding(mesh, P(*spec)))
  # A paged pool is shared by every row: sharded over the K/V heads only.
  cache_spec = (None, None, "model") if paged else ("data", None, "model")
  args = (put(q, "data", None, "model"), put(k, *cache_spec),
          put(v, *cache_spec), put(lengths, "data"))
  kwargs = {name: put(x, "data") for name, x in kwargs.items()}
  fn = jax.jit(_attend)
  SEEN.clear()
  compiled = fn.lower(*args, **kwargs).compile()
  got = compiled(*args, **kwargs)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
  # Each shard saw 2 of 4 rows and 2 of 8 query heads (1 of 4 K/V heads);
  # a paged pool all its blocks.
  q_shape, cache_shape = SEEN[-1]
  assert q_shape == (BATCH // 2, SQ, HEADS // 4, D), SEEN
  assert cache_shape[2] == KV_HEADS // 4, SEEN
  assert cache_shape[0] == (k.shape[0] if paged else BATCH // 2), SEEN
  assert got[0].sharding.is_equivalent_to(
      NamedSharding(mesh, P("data", None, "model")), 4)
  # Nothing is gathered: the cache never moves.
  hlo = compiled.as_text()
  assert "all-gather" not in hlo and "all-to-all" not in hlo


@pytest.mark.parametrize("paged,pool_mapped", [(False, True), (True, False),
                                               (True, True)])
def test_vmap_is_one_call_equal_to_per_element_calls(paged, pool_mapped):
  calls = [_call(10 + i, paged, alibi=True, batch=2) for i in range(3)]
  stack = lambda i: jnp.stack([c[0][i] for c in calls])
  q, k, v, lengths = (stack(i) for i in range(4))
  kw = {name: jnp.stack([c[1][name] for c in calls]) for name in calls[0][1]}
  if paged and not pool_mapped:
    # One pool shared by every element (the first call's), with every
    # element's own block table.
    k, v = calls[0][0][1], calls[0][0][2]
    in_axes = (0, None, None, 0)
  else:
    in_axes = (0, 0, 0, 0)
  SEEN.clear()
  got = jax.jit(jax.vmap(_attend, in_axes=in_axes))(q, k, v, lengths, **kw)
  assert len(SEEN) == 1  # one call for the whole vmap
  for i in range(3):
    ki, vi = (k, v) if in_axes[1] is None else (k[i], v[i])
    want = _attend(q[i], ki, vi, lengths[i],
                   **{name: x[i] for name, x in kw.items()})
    for g, w in zip(got, want):
      np.testing.assert_allclose(g[i], w, rtol=1e-5, atol=1e-5)


def test_explicit_sharding_runs_per_shard():
  mesh = jax.make_mesh((2, 4), ("data", "model"),
                       axis_types=(jax.sharding.AxisType.Explicit,) * 2,
                       devices=jax.devices("cpu")[:8])
  (q, k, v, lengths), kwargs = _call(3, paged=True)
  want = _attend(q, k, v, lengths, **kwargs)
  put = lambda x, *spec: jax.device_put(x, NamedSharding(mesh, P(*spec)))
  args = (put(q, "data", None, "model"), put(k, None, None, "model"),
          put(v, None, None, "model"), put(lengths, "data"))
  table = put(kwargs["block_table"], "data")
  SEEN.clear()
  compiled = jax.jit(lambda *a, t: _attend(*a, block_table=t)).lower(
      *args, t=table).compile()
  got = compiled(*args, t=table)
  assert SEEN[-1][0] == (BATCH // 2, SQ, HEADS // 4, D), SEEN
  assert "all-gather" not in compiled.as_text()
  assert jax.typeof(got[0]).sharding.spec == jax.typeof(args[0]).sharding.spec
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_cuda_lowering_of_a_vmap_is_one_custom_call():
  # pylint: disable-next=import-outside-toplevel
  from jax_flash.cuda import library
  if library.load_error() is not None:
    pytest.skip(f"no library to size the workspace: {library.load_error()}")
  pool = jax.ShapeDtypeStruct((10, 16, 2, 128), jnp.bfloat16)
  attend = lambda q, n, t: decode_primitive.decode_attention(
      q, pool_k, pool_v, n, config=CONFIG, block_table=t)
  pool_k = pool_v = jnp.zeros(pool.shape, pool.dtype)
  lowered = jax.jit(jax.vmap(attend)).trace(
      jax.ShapeDtypeStruct((3, 2, 1, 8, 128), jnp.bfloat16),
      jax.ShapeDtypeStruct((3, 2), jnp.int32),
      jax.ShapeDtypeStruct((3, 2, 4), jnp.int32)).lower(
          lowering_platforms=("cuda",))
  calls = [line for line in lowered.as_text().splitlines()
           if "stablehlo.custom_call @jax_flash_decode" in line]
  assert len(calls) == 1, calls
