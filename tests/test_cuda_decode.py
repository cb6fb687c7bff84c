"""The split-KV decoding kernel (csrc/decode/) against the float32 reference.

Skipped unless the library is built with the decoding kernel and the default
backend is a CUDA GPU. Through `jax_flash.cuda.attention` the forward of a
short query runs the decoding kernel (on unless JAX_FLASH_DECODE_KERNEL=0) and the
backward the training kernel, so FlashAttention's rule holds for out, lse
and every gradient (numerics.py). The paged cache is checked through
`decode.decode_call` against the contiguous one, bit for bit.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_qkv
from jax_flash import cuda
from jax_flash.config import AttentionConfig, MaskArrays
from jax_flash.cuda import decode
from jax_flash.reference import reference_attention
from numerics import check_against_reference, make_masks

DTYPE = jnp.bfloat16

pytestmark = pytest.mark.skipif(
    cuda.unavailable_reason() is not None or not decode.built(DTYPE, 128),
    reason=str(cuda.unavailable_reason() or "decoding kernel not built"))


@pytest.fixture(autouse=True)
def _decode_kernel_on(monkeypatch):
  monkeypatch.setenv(decode.ENABLE_ENV_VAR, "1")


def _inputs(seed, batch, sq, sk, heads, kv_heads, d, dtype=DTYPE):
  if not decode.built(dtype, d):
    pytest.skip(f"decoding kernel not built for {jnp.dtype(dtype).name} "
                f"head dim {d}")
  q, k, v = random_qkv(seed, batch, sq, sk, heads, kv_heads, d, d, dtype)
  assert decode.covers(q, k, v, ())
  return q, k, v


def _config(d, **options):
  return AttentionConfig(softmax_scale=d ** -0.5, **options)


@pytest.mark.parametrize("sq", [1, 3, 16])
@pytest.mark.parametrize("sk", [1, 17, 577, 4099])
@pytest.mark.parametrize("causal", [False, True])
def test_lengths(sq, sk, causal):
  # B * Hkv = 2 CTAs per split: long caches get many splits and the combine.
  q, k, v = _inputs(0, 1, sq, sk, 8, 2, 128)
  check_against_reference(cuda.attention, q, k, v,
                          _config(128, causal=causal), MaskArrays())


@pytest.mark.parametrize("heads,kv_heads", [(8, 8), (8, 4), (32, 8), (8, 1),
                                            (64, 1)])
@pytest.mark.parametrize("sq", [1, 4])
def test_gqa_row_packing(heads, kv_heads, sq):
  # (H / Hkv) * Sq rows of one K/V head: 1 .. 256, every warp arrangement.
  q, k, v = _inputs(1, 2, sq, 1000, heads, kv_heads, 128)
  check_against_reference(cuda.attention, q, k, v,
                          _config(128, causal=True), MaskArrays())


@pytest.mark.parametrize("d", [64, 128, 256])
def test_head_dims(d):
  q, k, v = _inputs(2, 3, 2, 2000, 8, 2, d)
  check_against_reference(cuda.attention, q, k, v, _config(d, causal=True),
                          MaskArrays())


@pytest.mark.parametrize("options,parts", [
    (dict(causal=True, window_left=100), {}),
    (dict(window_left=300, window_right=5), {}),
    (dict(softcap=5.0), {}),
    ({}, dict(alibi=True)),
    (dict(causal=True), dict(alibi=True)),
])
def test_masks_and_score_modifiers(options, parts):
  rng = np.random.default_rng(3)
  q, k, v = _inputs(3, 2, 4, 1500, 8, 2, 128)
  masks = make_masks(rng, 2, 4, 1500, 8, **parts)
  check_against_reference(cuda.attention, q, k, v, _config(128, **options),
                          masks)


def test_key_lengths_including_zero_and_full():
  q, k, v = _inputs(4, 4, 3, 3000, 8, 2, 128)
  lengths = jnp.array([0, 1, 1777, 3000], jnp.int32)
  check_against_reference(cuda.attention, q, k, v, _config(128, causal=True),
                          MaskArrays(kv_lengths=lengths))


def test_float16():
  q, k, v = _inputs(5, 2, 1, 999, 8, 2, 128, dtype=jnp.float16)
  check_against_reference(cuda.attention, q, k, v, _config(128),
                          MaskArrays())


def _paged(cache, block_size, order):
  """(B, S, Hkv, D) -> (num_blocks, block_size, Hkv, D) pages in `order`."""
  b, s, hkv, d = cache.shape
  pages = cache.reshape(b * (s // block_size), block_size, hkv, d)
  return pages[np.argsort(order)]


# Powers of two index blocks by shift and mask, other sizes by division.
@pytest.mark.parametrize("block_size,s", [(16, 1024), (64, 1024), (48, 960)])
def test_paged_cache_equals_contiguous(block_size, s):
  q, k, v = _inputs(6, 3, 4, s, 8, 2, 128)
  blocks_per_row = s // block_size
  order = np.random.default_rng(0).permutation(3 * blocks_per_row)
  table = jnp.asarray(order.reshape(3, blocks_per_row), jnp.int32)
  lengths = jnp.array([5, s, 700], jnp.int32)
  config = _config(128, causal=True, softcap=20.0)
  want = jax.jit(lambda *a: decode.decode_call(*a, config=config))(
      q, k, v, lengths)
  got = jax.jit(lambda *a: decode.decode_call(
      *a[:4], config=config, block_table=a[4]))(
          q, _paged(k, block_size, order), _paged(v, block_size, order),
          lengths, table)
  for name, a, b in zip(("out", "lse"), got, want):
    np.testing.assert_array_equal(np.asarray(a, np.float32),
                                  np.asarray(b, np.float32), err_msg=name)


def test_block_ids_out_of_range_read_as_empty_blocks():
  block_size, blocks = 16, 8
  q, k, v = _inputs(7, 1, 1, block_size * blocks, 4, 1, 128)
  order = np.arange(blocks)
  table = jnp.asarray(order[None], jnp.int32).at[0, 2].set(-3).at[0, 5].set(
      1000)
  config = _config(128)
  out, lse = jax.jit(lambda *a: decode.decode_call(
      *a[:4], config=config, block_table=a[4]))(
          q, _paged(k, block_size, order), _paged(v, block_size, order),
          jnp.array([block_size * blocks]), table)
  keep = np.ones(block_size * blocks, bool)
  keep[2 * block_size:3 * block_size] = False
  keep[5 * block_size:6 * block_size] = False
  f32 = lambda x: x.astype(jnp.float32)
  want_out, want_lse = reference_attention(f32(q), f32(k[:, keep]),
                                           f32(v[:, keep]), config,
                                           MaskArrays())
  np.testing.assert_allclose(np.asarray(out, np.float32),
                             np.asarray(want_out, np.float32), atol=2e-2)
  np.testing.assert_allclose(lse, want_lse, atol=1e-3)


@pytest.mark.parametrize("block_size", [None, 16])
def test_non_finite_cache_entries_past_the_lengths_are_never_used(
    block_size):
  # Slots past a row's length hold whatever was stored there: here inf and
  # NaN. The tiles that hold them (a contiguous cache brings whole 64-key
  # tiles in by tensor copies on sm_90) must mask them, with no 0 * inf.
  s = 1024
  q, k, v = _inputs(9, 3, 2, s, 8, 2, 128)
  lengths = jnp.array([1, 700, 1001], jnp.int32)
  stale = (jnp.arange(s)[None, :] >= lengths[:, None])[:, :, None, None]
  k_bad = jnp.where(stale, jnp.asarray(jnp.inf, k.dtype), k)
  v_bad = jnp.where(stale, jnp.asarray(jnp.nan, v.dtype), v)
  config = _config(128, causal=True)
  call = jax.jit(lambda *a: decode.decode_call(*a, config=config))
  want = call(q, k, v, lengths)
  if block_size is None:
    got = call(q, k_bad, v_bad, lengths)
  else:
    order = np.random.default_rng(1).permutation(3 * (s // block_size))
    table = jnp.asarray(order.reshape(3, -1), jnp.int32)
    got = jax.jit(lambda *a: decode.decode_call(
        *a[:4], config=config, block_table=a[4]))(
            q, _paged(k_bad, block_size, order),
            _paged(v_bad, block_size, order), lengths, table)
  for name, a, b in zip(("out", "lse"), got, want):
    np.testing.assert_array_equal(np.asarray(a, np.float32),
                                  np.asarray(b, np.float32), err_msg=name)


def test_lengths_past_the_capacity_are_clamped():
  q, k, v = _inputs(8, 2, 1, 300, 8, 2, 128)
  config = _config(128, causal=True)
  call = jax.jit(lambda *a: decode.decode_call(*a, config=config))
  past = call(q, k, v, jnp.array([10**6, 300], jnp.int32))
  full = call(q, k, v, jnp.array([300, 300], jnp.int32))
  for a, b in zip(past, full):
    np.testing.assert_array_equal(np.asarray(a, np.float32),
                                  np.asarray(b, np.float32))


@pytest.mark.parametrize("block_size", [None, 16, 64])
def test_kv_cache_api_runs_the_kernel(block_size):
  import jax_flash  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(9)
  batch, capacity, sq = 3, 512, 2
  q, k, v = _inputs(9, batch, sq, capacity, 8, 2, 128)
  new_k, new_v = k[:, :sq], v[:, :sq]
  lengths = jnp.array([0, 100, capacity - sq], jnp.int32)
  table = None
  if block_size is not None:
    order = rng.permutation(batch * capacity // block_size)
    table = jnp.asarray(order.reshape(batch, -1), jnp.int32)
    k, v = _paged(k, block_size, order), _paged(v, block_size, order)
  run = lambda impl: jax_flash.flash_attention_with_kv_cache(
      q, k, v, cache_seq_lengths=lengths, block_table=table, new_key=new_k,
      new_value=new_v, causal=True, return_lse=True, implementation=impl)
  got, want = run("cuda"), run("xla")
  np.testing.assert_allclose(np.asarray(got.out, np.float32),
                             np.asarray(want.out, np.float32), atol=2e-2)
  np.testing.assert_allclose(got.lse, want.lse, atol=1e-3)


@pytest.mark.parametrize("block_size", [None, 16])
def test_vmap_of_the_cache_api_is_one_kernel_call(block_size):
  # Two elements, each its own queries, lengths and cache (a paged one with
  # its own pool and block table): the vmap folds into one kernel launch
  # and equals the per-element calls.
  import jax_flash  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(11)
  batch, capacity, sq = 2, 256, 1
  parts = [_inputs(20 + e, batch, sq, capacity, 8, 2, 128) for e in range(2)]
  q, k, v = (jnp.stack([p[i] for p in parts]) for i in range(3))
  lengths = jnp.array([[5, capacity], [0, 130]], jnp.int32)
  tables = None
  if block_size is not None:
    orders = [rng.permutation(batch * capacity // block_size)
              for _ in range(2)]
    tables = jnp.stack([jnp.asarray(o.reshape(batch, -1), jnp.int32)
                        for o in orders])
    k = jnp.stack([_paged(k[e], block_size, orders[e]) for e in range(2)])
    v = jnp.stack([_paged(v[e], block_size, orders[e]) for e in range(2)])

  def attend(q, k, v, n, table):
    return jax_flash.flash_attention_with_kv_cache(
        q, k, v, cache_seq_lengths=n, block_table=table, causal=True,
        implementation="cuda").out

  args = (q, k, v, lengths, tables)
  in_axes = (0, 0, 0, 0, None if tables is None else 0)
  batched = jax.jit(jax.vmap(attend, in_axes=in_axes))
  assert batched.lower(*args).as_text().count("jax_flash_decode") == 1
  got = batched(*args)
  for e in range(2):
    want = attend(q[e], k[e], v[e], lengths[e],
                  None if tables is None else tables[e])
    np.testing.assert_allclose(np.asarray(got[e], np.float32),
                               np.asarray(want, np.float32), atol=1e-2)
