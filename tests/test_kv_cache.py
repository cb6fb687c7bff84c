"""flash_attention_with_kv_cache: contiguous and paged caches, in-place
appends, out-of-range values, bad shapes, jit/vmap/sharding, all against
the float32 reference of `flash_attention` run on each row's keys."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jax_flash
from conftest import assert_within_rule, max_abs_err
from jax_flash import flash_attention_with_kv_cache

# The reference and every path are compared in float32 at 2e-5.
pytestmark = pytest.mark.usefixtures("float32_matmuls")

CAPACITY = 64


def random_call(seed, batch, sq, heads, kv_heads, d, dv=None,
                capacity=CAPACITY, dtype=jnp.float32):
  """q (B, Sq, H, D), contiguous caches (B, capacity, Hkv, D|Dv), new k/v."""
  rng = np.random.default_rng(seed)
  dv = d if dv is None else dv
  make = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)
  return dict(query=make(batch, sq, heads, d),
              key_cache=make(batch, capacity, kv_heads, d),
              value_cache=make(batch, capacity, kv_heads, dv),
              new_key=make(batch, sq, kv_heads, d),
              new_value=make(batch, sq, kv_heads, dv))


def expected(query, key_cache, value_cache, lengths, new_key=None,
             new_value=None, **options):
  """(out, lse) of `flash_attention`'s float32 reference on each row's
  keys: the valid cache positions, then the new tokens (written at the end
  of the row when they would run past the capacity)."""
  batch, sq = query.shape[:2]
  capacity = key_cache.shape[1]
  f32 = lambda x: np.asarray(x, np.float32)
  lengths = np.clip(np.asarray(lengths), 0, capacity)
  keys = np.zeros((batch, capacity + sq) + key_cache.shape[2:], np.float32)
  values = np.zeros((batch, capacity + sq) + value_cache.shape[2:],
                    np.float32)
  if new_key is not None:
    lengths = np.minimum(lengths, capacity - sq)
  for b, n in enumerate(lengths):
    keys[b, :n], values[b, :n] = f32(key_cache[b, :n]), f32(value_cache[b, :n])
    if new_key is not None:
      keys[b, n:n + sq] = f32(new_key[b])
      values[b, n:n + sq] = f32(new_value[b])
  kv_lengths = lengths + (0 if new_key is None else sq)
  return _reference(f32(query), keys, values, kv_lengths, **options)


def _reference(query, keys, values, kv_lengths, **options):
  fn = jax.jit(lambda *args: jax_flash.flash_attention(
      *args[:3], kv_seq_lengths=args[3], alibi_slopes=args[4],
      return_lse=True, implementation="reference",
      **{k: v for k, v in options.items() if k != "alibi_slopes"}))
  return fn(query, keys, values, kv_lengths, options.get("alibi_slopes"))


def assert_matches(result, want, atol=2e-5):
  out, lse = want
  np.testing.assert_allclose(np.asarray(result.out, np.float32), out,
                             atol=atol, rtol=atol)
  assert np.array_equal(np.isneginf(np.asarray(result.lse)), np.isneginf(lse))
  np.testing.assert_allclose(np.asarray(result.lse), lse, atol=atol,
                             rtol=atol)


def to_paged(cache, block_size, seed, spare=3, table_width=None):
  """A contiguous cache as a shuffled pool of blocks with `spare` unused
  (random) blocks, and its (B, max_blocks) table."""
  batch, capacity = cache.shape[:2]
  per_row = capacity // block_size
  rng = np.random.default_rng(seed)
  num_blocks = batch * per_row + spare
  table = rng.permutation(num_blocks)[:batch * per_row].reshape(batch,
                                                                per_row)
  pool = np.asarray(rng.standard_normal((num_blocks, block_size) +
                                        cache.shape[2:]), cache.dtype)
  pool[table] = np.asarray(cache).reshape((batch, per_row, block_size) +
                                          cache.shape[2:])
  return jnp.asarray(pool), jnp.asarray(table, jnp.int32)


def lengths_for(seed, batch, sq, capacity=CAPACITY):
  """Random lengths that include 0 and a row filled to capacity."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(0, capacity - sq + 1, batch)
  lengths[0], lengths[-1] = 0, capacity - sq
  return jnp.asarray(lengths, jnp.int32)


@pytest.mark.parametrize("sq,group,d", [(1, 1, 64), (1, 8, 128), (4, 4, 256),
                                        (16, 2, 64)])
def test_append_and_attend_matches_reference(sq, group, d):
  call = random_call(sq * 10 + group, 3, sq, 2 * group, 2, d)
  lengths = lengths_for(sq, 3, sq)
  result = jax.jit(lambda c, n: flash_attention_with_kv_cache(
      **c, cache_seq_lengths=n, causal=True, return_lse=True))(call, lengths)
  assert_matches(result, expected(**call, lengths=lengths, causal=True))
  np.testing.assert_array_equal(result.cache_seq_lengths, lengths + sq)
  # The new tokens are in the cache, the rest is unchanged.
  for b, n in enumerate(np.asarray(lengths)):
    np.testing.assert_array_equal(result.key_cache[b, n:n + sq],
                                  call["new_key"][b])
    np.testing.assert_array_equal(result.value_cache[b, :n],
                                  call["value_cache"][b, :n])
    np.testing.assert_array_equal(result.key_cache[b, n + sq:],
                                  call["key_cache"][b, n + sq:])


def test_without_new_tokens_the_queries_are_the_last_positions():
  call = random_call(1, 4, 5, 4, 1, 32, dv=16)
  del call["new_key"], call["new_value"]
  lengths = jnp.array([0, 3, 40, CAPACITY], jnp.int32)
  result = flash_attention_with_kv_cache(
      **call, cache_seq_lengths=lengths, causal=True, return_lse=True)
  assert_matches(result, expected(**call, lengths=lengths, causal=True))
  assert result.key_cache is call["key_cache"]
  np.testing.assert_array_equal(result.cache_seq_lengths, lengths)


@pytest.mark.parametrize("block_size,append", [(16, True), (64, False)])
def test_paged_equals_contiguous(block_size, append):
  call = random_call(2, 3, 3, 8, 2, 64, capacity=128)
  if not append:
    del call["new_key"], call["new_value"]
  lengths = lengths_for(3, 3, 3, capacity=128)
  key_pool, table = to_paged(call["key_cache"], block_size, 4)
  value_pool, _ = to_paged(call["value_cache"], block_size, 4)
  options = dict(cache_seq_lengths=lengths, causal=True, return_lse=True)
  contiguous = flash_attention_with_kv_cache(**call, **options)
  paged = jax.jit(lambda c, kp, vp, t: flash_attention_with_kv_cache(
      **dict(c, key_cache=kp, value_cache=vp), block_table=t, **options))(
          call, key_pool, value_pool, table)
  np.testing.assert_array_equal(paged.out, contiguous.out)
  np.testing.assert_array_equal(paged.lse, contiguous.lse)
  np.testing.assert_array_equal(paged.cache_seq_lengths,
                                contiguous.cache_seq_lengths)
  rows = lambda pool: pool[table].reshape(contiguous.key_cache.shape[:2] +
                                          pool.shape[2:])
  np.testing.assert_array_equal(rows(paged.key_cache), contiguous.key_cache)
  np.testing.assert_array_equal(rows(paged.value_cache),
                                contiguous.value_cache)
  # Blocks outside the table are untouched.
  unused = np.setdiff1d(np.arange(key_pool.shape[0]), np.asarray(table))
  np.testing.assert_array_equal(paged.key_cache[unused], key_pool[unused])


OPTIONS = [
    # (options, with new tokens, paged)
    (dict(causal=False), True, False),
    (dict(causal=True, window_size=(5, -1)), False, True),
    (dict(window_size=(3, 2)), True, True),
    (dict(causal=True, softcap=2.0, softmax_scale=0.3), True, False),
    (dict(causal=True, alibi_slopes="heads"), False, False),
    (dict(window_size=(-1, 0), alibi_slopes="batch_heads", softcap=5.0),
     True, True),
]


@pytest.mark.parametrize("options,append,paged", OPTIONS, ids=str)
def test_masks_and_score_modifiers(options, append, paged):
  call = random_call(5, 3, 4, 4, 2, 32)
  if not append:
    del call["new_key"], call["new_value"]
  rng = np.random.default_rng(6)
  shapes = {"heads": (4,), "batch_heads": (3, 4)}
  if "alibi_slopes" in options:
    options = dict(options, alibi_slopes=jnp.asarray(
        rng.uniform(0.05, 0.5, shapes[options["alibi_slopes"]]),
        jnp.float32))
  lengths = jnp.array([9, 0, CAPACITY - 4], jnp.int32)
  args, block_table = dict(call), None
  if paged:
    args["key_cache"], block_table = to_paged(call["key_cache"], 16, 7)
    args["value_cache"], _ = to_paged(call["value_cache"], 16, 7)
  result = flash_attention_with_kv_cache(
      **args, block_table=block_table, cache_seq_lengths=lengths,
      return_lse=True, **options)
  assert_matches(result, expected(**call, lengths=lengths, **options))


def test_low_precision_within_the_rule():
  call = random_call(8, 2, 2, 8, 2, 128, dtype=jnp.bfloat16)
  lengths = jnp.array([37, 62], jnp.int32)
  result = flash_attention_with_kv_cache(**call, cache_seq_lengths=lengths,
                                         causal=True)
  assert result.out.dtype == jnp.bfloat16
  exact, _ = expected(**call, lengths=lengths, causal=True)
  # The error budget: bfloat16 rounding of the exact output.
  lowp = jnp.asarray(exact).astype(jnp.bfloat16)
  assert_within_rule("out", result.out, exact, lowp, 1e-3)


def test_lengths_past_capacity_are_clamped_and_overflow_goes_to_the_end():
  call = random_call(9, 4, 3, 2, 2, 16)
  # 70 > capacity (clamped to 64), -5 (clamped to 0), 62 (the three tokens
  # do not fit after it), 10 (they fit).
  lengths = jnp.array([70, -5, 62, 10], jnp.int32)
  result = flash_attention_with_kv_cache(**call, cache_seq_lengths=lengths,
                                         causal=True, return_lse=True)
  clamped = np.array([64, 0, 62, 10])
  assert_matches(result, expected(**call, lengths=clamped, causal=True))
  np.testing.assert_array_equal(result.cache_seq_lengths, [64, 3, 64, 13])
  # Rows 0 and 2 are full: their tokens overwrote the last three positions.
  for row, start in ((0, 61), (1, 0), (2, 61), (3, 10)):
    np.testing.assert_array_equal(result.key_cache[row, start:start + 3],
                                  call["new_key"][row])
    np.testing.assert_array_equal(result.value_cache[row, :start],
                                  call["value_cache"][row, :start])
    np.testing.assert_array_equal(result.key_cache[row, start + 3:],
                                  call["key_cache"][row, start + 3:])


def test_block_ids_out_of_range_are_empty_blocks():
  call = random_call(10, 2, 2, 4, 2, 32)
  key_pool, table = to_paged(call["key_cache"], 16, 11, spare=0)
  value_pool, _ = to_paged(call["value_cache"], 16, 11, spare=0)
  num_blocks = key_pool.shape[0]
  # Row 0: its second block is missing (-1) and its fourth past the pool;
  # the new tokens at 30, 31 land in the missing block and are dropped.
  # Row 1: a huge id in the block the new tokens go to.
  bad = np.asarray(table).copy()
  bad[0, 1], bad[0, 3], bad[1, 2] = -1, num_blocks, 2**31 - 1
  lengths = jnp.array([30, 40], jnp.int32)
  result = flash_attention_with_kv_cache(
      call["query"], key_pool, value_pool, cache_seq_lengths=lengths,
      block_table=jnp.asarray(bad), new_key=call["new_key"],
      new_value=call["new_value"], return_lse=True)
  # The same attention with the missing blocks' keys removed.
  valid = np.repeat((bad >= 0) & (bad < num_blocks), 16, axis=1)
  for b, n in enumerate(np.asarray(lengths)):
    keys = np.concatenate([call["key_cache"][b, :n], call["new_key"][b]])
    values = np.concatenate([call["value_cache"][b, :n],
                             call["new_value"][b]])
    keep = valid[b, :n + 2]
    out, lse = jax.jit(functools.partial(
        jax_flash.flash_attention, return_lse=True,
        implementation="reference"))(call["query"][b], keys[keep],
                                     values[keep])
    np.testing.assert_allclose(result.out[b], out, atol=2e-5)
    np.testing.assert_allclose(result.lse[b], lse, atol=2e-5)
  # Every new token fell in a missing block: nothing was written.
  changed = np.any(np.asarray(result.key_cache != key_pool), axis=(2, 3))
  assert not changed.any(), np.argwhere(changed)


def test_in_place_append_under_jit_with_donation():
  call = random_call(12, 2, 1, 4, 2, 32, capacity=4096)
  key_pool, table = to_paged(call["key_cache"], 64, 13)
  value_pool, _ = to_paged(call["value_cache"], 64, 13)
  lengths = jnp.array([5, 2700], jnp.int32)

  def step(key_cache, value_cache, query, new_key, new_value, table):
    result = flash_attention_with_kv_cache(
        query, key_cache, value_cache, cache_seq_lengths=lengths,
        block_table=table, new_key=new_key, new_value=new_value)
    return result.out, result.key_cache, result.value_cache

  for caches, t in (((call["key_cache"], call["value_cache"]), None),
                    ((key_pool, value_pool), table)):
    args = caches + (call["query"], call["new_key"], call["new_value"], t)
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(*args).compile()
    cache_bytes = sum(c.nbytes for c in caches)
    memory = compiled.memory_analysis()
    assert memory.alias_size_in_bytes >= cache_bytes
    if t is None:
      # Reading a contiguous cache moves only the key blocks it needs: twice
      # the capacity adds no temporary memory (a GPU's fixed GEMM workspace
      # is in both).
      bigger = random_call(12, 2, 1, 4, 2, 32, capacity=8192)
      bigger_args = (bigger["key_cache"], bigger["value_cache"]) + args[2:]
      grown = (jax.jit(step, donate_argnums=(0, 1)).lower(*bigger_args)
               .compile().memory_analysis().temp_size_in_bytes -
               memory.temp_size_in_bytes)
      assert grown < cache_bytes / 4, (grown, memory)
    pointers = [c.unsafe_buffer_pointer() for c in caches]
    copies = [jnp.array(c, copy=True) for c in caches]
    _, new_keys, new_values = compiled(*args)
    assert [new_keys.unsafe_buffer_pointer(),
            new_values.unsafe_buffer_pointer()] == pointers
    assert all(c.is_deleted() for c in caches)
    assert max_abs_err(new_keys, copies[0]) > 0  # the tokens were written


def test_under_vmap():
  calls = [random_call(14 + i, 2, 2, 4, 2, 16) for i in range(3)]
  stacked = jax.tree.map(lambda *x: jnp.stack(x), *calls)
  lengths = jnp.array([[0, 5], [60, 62], [17, 1]], jnp.int32)
  fn = lambda c, n: flash_attention_with_kv_cache(
      **c, cache_seq_lengths=n, causal=True, return_lse=True)
  got = jax.jit(jax.vmap(fn))(stacked, lengths)
  for i, call in enumerate(calls):
    want = jax.jit(fn)(call, lengths[i])
    np.testing.assert_allclose(got.out[i], want.out, atol=2e-5)
    np.testing.assert_array_equal(got.key_cache[i], want.key_cache)


COLLECTIVE = re.compile(r"= \(?([^=]*?)\)? (all-gather|all-reduce|all-to-all|"
                        r"collective-permute|reduce-scatter)\(")


def collective_sizes(hlo):
  """(op, elements) of every collective in a compiled HLO text."""
  sizes = []
  for shapes, op in COLLECTIVE.findall(hlo):
    for dims in re.findall(r"\[([\d,]*)\]", shapes):
      sizes.append((op, int(np.prod([int(d) for d in dims.split(",") if d]))))
  return sizes


@pytest.mark.parametrize("paged", [False, True])
def test_sharded_over_batch_and_kv_heads(paged):
  devices = np.array(jax.devices()[:8])
  if devices.size < 8:
    pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  mesh = Mesh(devices.reshape(4, 2), ("data", "model"))
  call = random_call(20, 8, 2, 8, 4, 16)
  lengths = jax.device_put(lengths_for(21, 8, 2),
                           NamedSharding(mesh, P("data")))
  heads = NamedSharding(mesh, P("data", None, "model"))
  if paged:
    # The pool is shared by all rows: shard it over the K/V heads only.
    call["key_cache"], table = to_paged(call["key_cache"], 16, 22)
    call["value_cache"], _ = to_paged(call["value_cache"], 16, 22)
    pool = NamedSharding(mesh, P(None, None, "model"))
    cache_sharding = pool
  else:
    table, cache_sharding = None, heads
  want = flash_attention_with_kv_cache(**call, cache_seq_lengths=lengths,
                                       block_table=table, causal=True)
  placed = {k: jax.device_put(v, cache_sharding if "cache" in k else heads)
            for k, v in call.items()}
  fn = jax.jit(lambda c, n, t: flash_attention_with_kv_cache(
      **c, cache_seq_lengths=n, block_table=t, causal=True))
  got = fn(placed, lengths, table)
  np.testing.assert_allclose(got.out, want.out, atol=2e-5)
  np.testing.assert_array_equal(got.key_cache, want.key_cache)
  assert got.key_cache.sharding.is_equivalent_to(cache_sharding, 4)
  assert got.out.sharding.is_equivalent_to(heads, 4)
  # The caches never move. A contiguous cache is updated and read where it
  # lives: only the longest row's length (the blockwise loop's bound) is
  # reduced across devices. The pool of a paged cache is shared by all rows
  # and so replicated over the batch shards: each receives every row's new
  # tokens (B * Sq of them), nothing larger.
  hlo = fn.lower(placed, lengths, table).compile().as_text()
  sizes = collective_sizes(hlo)
  if paged:
    assert sizes and max(n for _, n in sizes) <= call["new_key"].size, sizes
  else:
    assert all(op == "all-reduce" and n == 1 for op, n in sizes), sizes


def test_implementations():
  call = random_call(23, 2, 3, 4, 2, 16)
  lengths = jnp.array([4, 33], jnp.int32)
  run = lambda impl: flash_attention_with_kv_cache(
      **call, cache_seq_lengths=lengths, causal=True, implementation=impl)
  np.testing.assert_allclose(run("xla").out, run("reference").out, atol=2e-5)
  with pytest.raises(ValueError, match="implementation='cuda' cannot serve"):
    run("cuda")


STATIC = ("window_size", "implementation")


def _bad(**changes):
  call = random_call(24, 2, 2, 4, 2, 16)
  call.update(cache_seq_lengths=jnp.array([1, 2], jnp.int32))
  call.update(changes)
  static = {k: call.pop(k) for k in STATIC if k in call}
  return call, static


BAD = [
    (dict(query=jnp.zeros((2, 4, 16))), ValueError, r"query must have rank 4"),
    (dict(query=jnp.zeros((2, 2, 4, 16), jnp.int32)), TypeError,
     r"query must be float32"),
    (dict(key_cache=jnp.zeros((2, 64, 2, 16), jnp.bfloat16)), TypeError,
     r"key_cache must have the query's dtype"),
    (dict(value_cache=jnp.zeros((2, 64, 16))), ValueError,
     r"value_cache must have rank 4 \(B, S_max, Hkv, D\)"),
    (dict(value_cache=jnp.zeros((2, 32, 2, 16))), ValueError,
     r"key_cache and value_cache must agree.*\(2, 64, 2, 16\).*"
     r"\(2, 32, 2, 16\)"),
    (dict(key_cache=jnp.zeros((3, 64, 2, 16)),
          value_cache=jnp.zeros((3, 64, 2, 16))), ValueError,
     r"contiguous key_cache must have shape \(2, S_max, 2, 16\)"),
    (dict(key_cache=jnp.zeros((2, 64, 2, 8))), ValueError,
     r"agree|same head dim"),
    (dict(key_cache=jnp.zeros((2, 64, 3, 16)),
          value_cache=jnp.zeros((2, 64, 3, 16))), ValueError,
     r"multiple of the number of key/value heads of key_cache"),
    (dict(cache_seq_lengths=jnp.array([1, 2, 3])), ValueError,
     r"cache_seq_lengths must have shape \(2,\)"),
    (dict(cache_seq_lengths=jnp.array([1.0, 2.0])), TypeError,
     r"cache_seq_lengths must be an integer array"),
    (dict(new_value=None), ValueError, r"new_key and new_value"),
    (dict(new_key=jnp.zeros((2, 3, 2, 16))), ValueError,
     r"new_key must have shape \(2, 2, 2, 16\).*got shape \(2, 3, 2, 16\)"),
    (dict(key_cache=jnp.zeros((2, 1, 2, 16)),
          value_cache=jnp.zeros((2, 1, 2, 16))), ValueError,
     r"2 new tokens .* do not fit in a cache of 1 positions per row"),
    (dict(new_value=jnp.zeros((2, 2, 2, 16), jnp.bfloat16)), TypeError,
     r"new_value must have the cache's dtype"),
    (dict(block_table=jnp.zeros((2,), jnp.int32)), ValueError,
     r"block_table must have rank 2"),
    (dict(key_cache=jnp.zeros((8, 16, 2, 16)),
          value_cache=jnp.zeros((8, 16, 2, 16)),
          block_table=jnp.zeros((3, 4), jnp.int32)), ValueError,
     r"block_table must have shape \(2, max_blocks\).*\(3, 4\)"),
    (dict(key_cache=jnp.zeros((8, 16, 2, 16)),
          value_cache=jnp.zeros((8, 16, 2, 16)),
          block_table=jnp.zeros((2, 4), jnp.float32)), TypeError,
     r"block_table must be an integer array"),
    (dict(key_cache=jnp.zeros((8, 24, 2, 16)),
          value_cache=jnp.zeros((8, 24, 2, 16)),
          block_table=jnp.zeros((2, 4), jnp.int32)), ValueError,
     r"block size must be a positive multiple of 16.*\(8, 24, 2, 16\)"),
    (dict(window_size=(3,)), ValueError, r"window_size must be a pair"),
    (dict(alibi_slopes=jnp.ones((3,))), ValueError, r"alibi_slopes must have"),
    (dict(implementation="triton"), ValueError, r"implementation must be"),
]


@pytest.mark.parametrize("changes,error,message", BAD,
                         ids=[m for _, _, m in BAD])
def test_bad_arguments_raise_at_trace_time(changes, error, message):
  call, static = _bad(**changes)
  with pytest.raises(error, match=message):
    jax.eval_shape(lambda c: flash_attention_with_kv_cache(**c, **static),
                   call)
