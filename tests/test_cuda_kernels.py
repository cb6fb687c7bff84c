"""The CUDA kernels through jax_flash.cuda, against the float32 reference.

Skipped unless the library is built and the default backend is a CUDA GPU.
Every case holds out, lse, dq, dk, dv (and dalibi) to FlashAttention's rule
err(kernel) <= 2 * err(reference in the input dtype) + atol (numerics.py),
with gradients through both out and lse.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jax_flash
from conftest import random_qkv
from jax_flash import cuda
from jax_flash.config import AttentionConfig, MaskArrays
from jax_flash.cuda import library
from numerics import check_against_reference, make_masks

pytestmark = pytest.mark.skipif(cuda.unavailable_reason() is not None,
                                reason=str(cuda.unavailable_reason()))

DTYPE = jnp.bfloat16


def _inputs(seed, batch, sq, sk, heads, kv_heads, d, dv=None, dtype=DTYPE):
  q, k, v = random_qkv(seed, batch, sq, sk, heads, kv_heads, d, dv, dtype)
  reason = cuda.unsupported_reason(q, k, v, AttentionConfig(1.0),
                                   MaskArrays())
  if reason is not None:
    pytest.skip(reason)
  return q, k, v


def _config(d, **options):
  return AttentionConfig(softmax_scale=d ** -0.5, **options)


def _check_masked(seed, batch, sq, sk, heads, kv_heads, options, parts):
  """D = 128 with config `options` and random mask arrays `parts`
  (make_masks), against the float32 reference."""
  q, k, v = _inputs(seed, batch, sq, sk, heads, kv_heads, 128)
  masks = make_masks(np.random.default_rng(seed), batch, sq, sk, heads,
                     **parts)
  check_against_reference(cuda.attention, q, k, v, _config(128, **options),
                          masks)


@pytest.mark.parametrize("sq,sk", [(1, 1), (17, 17), (113, 113), (257, 257),
                                   (1000, 1000), (1, 257), (113, 1000),
                                   (1000, 17)])
@pytest.mark.parametrize("causal", [False, True])
def test_lengths(sq, sk, causal):
  q, k, v = _inputs(0, 2, sq, sk, 4, 2, 128)
  check_against_reference(cuda.attention, q, k, v,
                          _config(128, causal=causal), MaskArrays())


@pytest.mark.parametrize("heads,kv_heads", [(8, 8), (8, 4), (8, 1)])
@pytest.mark.parametrize("causal", [False, True])
def test_gqa(heads, kv_heads, causal):
  q, k, v = _inputs(1, 2, 113, 257, heads, kv_heads, 128)
  check_against_reference(cuda.attention, q, k, v,
                          _config(128, causal=causal), MaskArrays())


@pytest.mark.parametrize("options,parts", [
    (dict(window_left=32, window_right=8), {}),
    (dict(causal=True, window_left=64), {}),
    (dict(softcap=5.0), {}),
    ({}, dict(alibi=True)),
    ({}, dict(segments=True)),
    ({}, dict(lengths=True)),
    (dict(causal=True), dict(lengths=True)),
    (dict(causal=True, softcap=10.0, window_left=50),
     dict(alibi=True, segments=True, lengths=True)),
])
def test_masks(options, parts):
  _check_masked(2, 3, 130, 200, 4, 2, options, parts)


@pytest.mark.parametrize("options,parts", [
    (dict(causal=True), dict(lengths=True)),
    (dict(window_left=100, window_right=0), dict(segments=True)),
    ({}, dict(lengths=True)),
])
def test_more_work_tiles_than_multiprocessors(options, parts):
  # 9 query tiles x 16 heads x 2 rows = 288 tiles of 128 rows, more than an
  # H100/H200 has SMs: the persistent sm90 forward's CTAs each take several,
  # and with Sq > Sk under a causal mask the first tiles see no key at all.
  # Without a mask every tile has the same keys, the last ones a partial
  # K/V tile.
  _check_masked(7, 2, 1100, 700, 16, 4, options, parts)


@pytest.mark.parametrize("options,parts,sk", [
    (dict(causal=True), {}, 4500),
    (dict(causal=True), dict(lengths=True), 4500),
    ({}, dict(lengths=True), 4500),
    ({}, {}, 1000),
    (dict(causal=True), {}, 1000),
])
def test_head_dim_64_three_warpgroup_tiles(options, parts, sk):
  """On Hopper the D = 64 forward's plain variant runs 192-row query tiles
  on three consumer warpgroups (csrc/sm90/tile_size.h), under a causal mask
  only from 4,096 keys on (two warpgroups below). The first query tile is
  the partial one: Sq = 300 pads it with 84 rows before row 0, so its first
  warpgroup has no row inside the sequence. A causal diagonal across the
  tiles with Sq < Sk, a partial last K/V tile, lengths that end inside a
  tile."""
  rng = np.random.default_rng(29)
  q, k, v = _inputs(29, 2, 300, sk, 4, 2, 64)
  masks = make_masks(rng, 2, 300, sk, 4, **parts)
  check_against_reference(cuda.attention, q, k, v, _config(64, **options),
                          masks)


@pytest.mark.parametrize("d,dv", [(64, 64), (40, 40), (128, 64), (96, 128)])
def test_padded_head_dims(d, dv):
  q, k, v = _inputs(3, 2, 77, 91, 4, 2, d, dv)
  check_against_reference(cuda.attention, q, k, v, _config(d, causal=True),
                          MaskArrays())


@pytest.mark.parametrize("d,options,parts", [
    (64, dict(causal=True), dict(segments=True, lengths=True)),
    (128, dict(causal=True), {}),
    (192, dict(window_left=40, window_right=10), dict(lengths=True)),
    (224, {}, dict(segments=True)),
    (256, dict(causal=True, softcap=8.0), dict(alibi=True)),
])
def test_variants_for_less_shared_memory(monkeypatch, d, options, parts):
  """The leaner kernels an A100 runs (163 KB of shared memory per block),
  checked on a larger GPU by lowering the limit the handlers assume. They
  are sm80 kernels: an sm90 GPU always offers the 227 KB its own kernels
  are sized for, so the sm80 ones are asked for by name."""
  monkeypatch.setenv("JAX_FLASH_MAX_SMEM_PER_BLOCK", str(163 * 1024))
  monkeypatch.setenv("JAX_FLASH_FORCE_ARCH", "sm80")
  rng = np.random.default_rng(14)
  q, k, v = _inputs(14, 2, 150, 233, 4, 2, d)
  masks = make_masks(rng, 2, 150, 233, 4, **parts)
  check_against_reference(cuda.attention, q, k, v, _config(d, **options),
                          masks)


# Shared memory per block with room for the backward's two Q/dO stages but
# not for its staged dQ tile (csrc/sm80/flash_bwd_kernel.h).
@pytest.mark.parametrize("d, limit_kb", [(64, 200), (128, 180)])
def test_backward_with_dq_atomics_where_staging_does_not_fit(
    monkeypatch, d, limit_kb):
  """There the sm80 backward adds dQ with per-element atomics (on sm90 it
  otherwise stages dQ in shared memory for the bulk-copy engine): both
  paths are checked. The sm80 kernel is asked for by name: an sm90 GPU
  runs its own backward at D = 128, sized for the 227 KB every sm90 part
  offers."""
  monkeypatch.setenv("JAX_FLASH_MAX_SMEM_PER_BLOCK", str(limit_kb * 1024))
  monkeypatch.setenv("JAX_FLASH_FORCE_ARCH", "sm80")
  rng = np.random.default_rng(16)
  q, k, v = _inputs(16, 2, 301, 190, 4, 2, d)
  masks = make_masks(rng, 2, 301, 190, 4, segments=True, lengths=True)
  check_against_reference(cuda.attention, q, k, v,
                          _config(d, causal=True), masks)


def test_too_little_shared_memory_is_a_clear_error(monkeypatch):
  monkeypatch.setenv("JAX_FLASH_MAX_SMEM_PER_BLOCK", "1000")
  q, k, v = _inputs(15, 1, 64, 64, 2, 2, 64)
  forward = jax.jit(cuda.attention_forward, static_argnums=3)
  with pytest.raises(Exception, match="bytes of shared memory per block"):
    jax.block_until_ready(forward(q, k, v, _config(64), MaskArrays()))


@pytest.mark.parametrize("causal", [False, True])
def test_float16(causal):
  q, k, v = _inputs(4, 2, 113, 377, 4, 2, 128, dtype=jnp.float16)
  check_against_reference(cuda.attention, q, k, v,
                          _config(128, causal=causal), MaskArrays())


def _grads(config, masks=MaskArrays()):
  def loss(q, k, v):
    out, lse = cuda.attention(q, k, v, config, masks)
    return jnp.sum(out.astype(jnp.float32) ** 2) + jnp.sum(
        jnp.where(jnp.isfinite(lse), lse, 0.0))
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def _assert_gradients_repeat_bitwise(q, k, v, config, masks=MaskArrays()):
  """Two runs of the gradients of (q, k, v) are bitwise equal."""
  grads = _grads(config, masks)
  first, second = grads(q, k, v), grads(q, k, v)
  for a, b in zip(first, second):
    np.testing.assert_array_equal(np.asarray(a, np.float32),
                                  np.asarray(b, np.float32))


def test_deterministic_gradients_are_bitwise_equal():
  q, k, v = _inputs(5, 2, 1000, 1000, 8, 2, 128)
  _assert_gradients_repeat_bitwise(
      q, k, v, _config(128, causal=True, deterministic=True))


@pytest.mark.parametrize("arch", ["sm90", "sm80"])
@pytest.mark.parametrize("options,parts", [
    ({}, {}),
    (dict(causal=True), {}),
    (dict(window_left=100, window_right=20), {}),
    (dict(causal=True), dict(segments=True, lengths=True)),
    (dict(softcap=5.0), dict(alibi=True)),
    ({}, dict(segments=True, lengths=True)),
])
def test_deterministic_mode_under_every_mask(monkeypatch, arch, options,
                                             parts):
  """Deterministic mode orders each query tile's dQ additions over the key
  tiles that see it (csrc/common/dq_order.h), and every mask changes which
  tiles those are: each case holds to the rule (dalibi too) and a second
  run is bitwise equal. Several key and query tiles, GQA 4:1, a query
  shorter than the keys; both archs where built (sm80 elsewhere). Masks
  without a window take the cyclic order on sm90 (lengths: fewer key and
  query tiles per row than the grid's)."""
  monkeypatch.setenv("JAX_FLASH_FORCE_ARCH", arch)
  rng = np.random.default_rng(17)
  q, k, v = _inputs(17, 2, 300, 700, 8, 2, 128)
  masks = make_masks(rng, 2, 300, 700, 8, **parts)
  config = _config(128, deterministic=True, **options)
  check_against_reference(cuda.attention, q, k, v, config, masks)
  _assert_gradients_repeat_bitwise(q, k, v, config, masks)


@pytest.mark.parametrize("options", [{}, dict(causal=True)])
def test_deterministic_mode_with_more_key_tiles_than_half_the_gpu(
    monkeypatch, options):
  """The sm90 backward's cyclic dQ order and its key tiles in launch order
  need every key tile CTA of a (batch row, K/V head) resident at once (the
  launch asks for room for two such groups); with more key tiles the launch
  keeps the descending order. Keys for a few 128-key tiles more than half
  the multiprocessors, a short query."""
  monkeypatch.setenv("JAX_FLASH_FORCE_ARCH", "sm90")
  sms = getattr(jax.devices()[0], "core_count", None) or 144
  seqlen_k = 128 * (sms // 2 + 3) + 5
  q, k, v = _inputs(29, 1, 70, seqlen_k, 2, 1, 128)
  config = _config(128, deterministic=True, **options)
  check_against_reference(cuda.attention, q, k, v, config)
  _assert_gradients_repeat_bitwise(q, k, v, config)


@pytest.mark.parametrize("arch", ["sm90", "sm80"])
@pytest.mark.parametrize("options,parts", [
    (dict(causal=True), {}),
    (dict(window_left=100, window_right=20), dict(segments=True,
                                                  lengths=True)),
    (dict(softcap=5.0, causal=True), dict(alibi=True)),
    (dict(causal=True, deterministic=True), dict(alibi=True, lengths=True)),
    ({}, dict(lengths=True)),
])
def test_head_dim_256(monkeypatch, arch, options, parts):
  """D = 256, which the sm90 backward runs split-D (64 keys a CTA, each
  consumer warpgroup half of the queries of S^T and dP^T and half of D of
  dV, dK and dQ; P^T and dS^T through shared memory): masks, score
  modifiers, GQA 4:1, lengths that end inside a tile, deterministic dalibi
  (bitwise repeated). Both archs where built (sm80 elsewhere)."""
  monkeypatch.setenv("JAX_FLASH_FORCE_ARCH", arch)
  rng = np.random.default_rng(23)
  q, k, v = _inputs(23, 2, 200, 333, 8, 2, 256)
  masks = make_masks(rng, 2, 200, 333, 8, **parts)
  config = _config(256, **options)
  check_against_reference(cuda.attention, q, k, v, config, masks)
  if config.deterministic:
    _assert_gradients_repeat_bitwise(q, k, v, config, masks)


@pytest.mark.parametrize("arch", ["sm90", "sm80"])
@pytest.mark.parametrize("d,options,parts", [
    (96, dict(causal=True), dict(lengths=True)),
    (96, dict(window_left=100, window_right=20, deterministic=True),
     dict(alibi=True, segments=True)),
    (192, dict(causal=True), {}),
    (192, dict(softcap=5.0, deterministic=True),
     dict(alibi=True, lengths=True)),
    (160, dict(causal=True), dict(segments=True)),
    (160, dict(window_left=100, deterministic=True),
     dict(alibi=True, lengths=True)),
    (224, {}, dict(lengths=True)),
    (224, dict(causal=True, softcap=5.0, deterministic=True),
     dict(alibi=True, segments=True)),
])
def test_head_dims_between_powers_of_two(monkeypatch, arch, d, options,
                                         parts):
  """D = 96 and 192 on the sm90 backward (128 keys a CTA at 96, K and V in
  32-byte swizzle atoms for dQ's 48 columns; split-D with two Q/dO stages at
  192, every row in 64-byte atoms for the 96-column halves), 160 and 224
  on it too (split-D, 32-byte atoms for the 80- and 112-column halves; one
  Q/dO stage at 224) and on the sm90 forward (wgmma N = 160 and 224 in its
  P V product): masks,
  score modifiers, GQA 4:1, lengths that end inside a tile, deterministic
  dalibi (bitwise repeated). Both archs where built (sm80 elsewhere)."""
  monkeypatch.setenv("JAX_FLASH_FORCE_ARCH", arch)
  rng = np.random.default_rng(29)
  q, k, v = _inputs(29, 2, 200, 333, 8, 2, d)
  masks = make_masks(rng, 2, 200, 333, 8, **parts)
  config = _config(d, **options)
  check_against_reference(cuda.attention, q, k, v, config, masks)
  if config.deterministic:
    _assert_gradients_repeat_bitwise(q, k, v, config, masks)


@pytest.mark.parametrize("arch", ["sm90", "sm80"])
@pytest.mark.parametrize("offsets,options,parts", [
    # Diagonal offset 70 - 120 = -50: the first 50 rows see no key.
    ((0, 120), dict(causal=True), {}),
    # Keys [i + 64, i + 164] of 200 by global position.
    ((64, 0), dict(window_left=70, window_right=30), dict(alibi=True)),
    ((1000, 0), dict(causal=True, softcap=5.0, window_left=900),
     dict(alibi=True, segments=True)),
    ((5, 3000), dict(causal=True), dict(lengths=True)),
])
def test_position_offsets(monkeypatch, arch, offsets, options, parts):
  """A call that is one block of a larger problem (a ring step): causal,
  window and alibi see the global positions q_offset + i and kv_offset + j.
  The blocks are cut by the diagonal, cut by the window far from position
  0, or hidden entirely (every row empty); lengths and segment ids keep the
  call's own positions. Both archs where built (sm80 elsewhere)."""
  monkeypatch.setenv("JAX_FLASH_FORCE_ARCH", arch)
  rng = np.random.default_rng(19)
  q, k, v = _inputs(19, 2, 130, 200, 4, 2, 128)
  masks = make_masks(rng, 2, 130, 200, 4, **parts)._replace(
      q_offset=jnp.int32(offsets[0]), kv_offset=jnp.int32(offsets[1]))
  check_against_reference(cuda.attention, q, k, v, _config(128, **options),
                          masks)


def test_forward_and_backward_entry_points_match_the_vjp():
  q, k, v = _inputs(11, 2, 100, 130, 4, 2, 128)
  config = _config(128, causal=True, deterministic=True)
  dout = random_qkv(12, 2, 100, 130, 4, 2, 128, dtype=DTYPE)[0]
  out, lse = jax.jit(cuda.attention_forward, static_argnums=3)(
      q, k, v, config, MaskArrays())
  grads = jax.jit(cuda.attention_backward, static_argnums=6)(
      q, k, v, out, lse, dout, config, MaskArrays())
  want_out, vjp = jax.vjp(
      lambda q, k, v: cuda.attention(q, k, v, config, MaskArrays())[0],
      q, k, v)
  want = vjp(dout)
  for a, b in zip((out,) + grads, (want_out,) + want):
    np.testing.assert_array_equal(np.asarray(a, np.float32),
                                  np.asarray(b, np.float32))


def test_public_api_runs_the_kernels():
  q, k, v = _inputs(6, 2, 64, 64, 4, 4, 128)
  out = jax_flash.flash_attention(q, k, v, causal=True, implementation="cuda")
  want, _ = cuda.attention(q, k, v, _config(128, causal=True), MaskArrays())
  np.testing.assert_array_equal(np.asarray(out, np.float32),
                                np.asarray(want, np.float32))


def _attend_one(q, k, v):
  """Unbatched (S, H, D) attention through the batched kernel op."""
  out, lse = cuda.attention(q[None], k[None], v[None],
                            _config(q.shape[-1], causal=True), MaskArrays())
  return out[0], lse[0]


def test_vmap_and_grad_match_per_example_calls():
  q, k, v = _inputs(7, 3, 65, 80, 4, 2, 128)
  out, lse = jax.jit(jax.vmap(_attend_one, in_axes=(0, 0, 0)))(q, k, v)
  loss = lambda q, k, v: jnp.sum(_attend_one(q, k, v)[0].astype(jnp.float32))
  dq = jax.jit(jax.vmap(jax.grad(loss), in_axes=(0, 0, 0)))(q, k, v)
  for i in range(3):
    want_out, want_lse = _attend_one(q[i], k[i], v[i])
    np.testing.assert_array_equal(np.asarray(out[i], np.float32),
                                  np.asarray(want_out, np.float32))
    np.testing.assert_array_equal(lse[i], want_lse)
    np.testing.assert_allclose(np.asarray(dq[i], np.float32), np.asarray(
        jax.grad(loss)(q[i], k[i], v[i]), np.float32), atol=2e-2)


def test_checkpoint_shard_map_and_pmap_agree_with_plain_grad():
  q, k, v = _inputs(8, 2, 96, 96, 4, 2, 128)
  config = _config(128, causal=True, deterministic=True)
  plain = _grads(config)(q, k, v)

  def loss(q, k, v):
    out, lse = cuda.attention(q, k, v, config, MaskArrays())
    return jnp.sum(out.astype(jnp.float32) ** 2) + jnp.sum(
        jnp.where(jnp.isfinite(lse), lse, 0.0))

  remat = jax.jit(jax.grad(jax.checkpoint(loss), argnums=(0, 1, 2)))(q, k, v)
  mesh = jax.make_mesh((len(jax.devices()),), ("data",))
  per_device = jax.shard_map(
      lambda q, k, v: jax.grad(loss, argnums=(0, 1, 2))(q, k, v),
      mesh=mesh, in_specs=P(), out_specs=P())
  sharded = jax.jit(per_device)(q, k, v)
  pmapped = jax.pmap(jax.grad(loss, argnums=(0, 1, 2)))(
      q[None], k[None], v[None])
  for got in (remat, sharded, tuple(g[0] for g in pmapped)):
    for a, b in zip(got, plain):
      np.testing.assert_array_equal(np.asarray(a, np.float32),
                                    np.asarray(b, np.float32))


def test_batch_sharded_jit_matches_unsharded():
  q, k, v = _inputs(9, 2, 96, 96, 4, 2, 128)
  mesh = jax.make_mesh((len(jax.devices()),), ("data",))
  put = lambda x: jax.device_put(x, NamedSharding(mesh, P("data")))
  grads = _grads(_config(128, deterministic=True))
  for a, b in zip(grads(put(q), put(k), put(v)), grads(q, k, v)):
    np.testing.assert_array_equal(np.asarray(a, np.float32),
                                  np.asarray(b, np.float32))


def test_kernel_errors_surface_as_jax_errors(monkeypatch):
  q, k, v = _inputs(10, 1, 64, 64, 2, 2, 128)
  # The handler checks its scratch buffer; a too small one is its error.
  monkeypatch.setattr(library, "bwd_workspace_bytes", lambda *shape: 0)
  grads = _grads(_config(128))
  with pytest.raises(Exception, match="jax_flash_bwd"):
    jax.block_until_ready(grads(q, k, v))


def test_too_small_forward_workspace_is_a_clear_error(monkeypatch):
  q, k, v = _inputs(11, 1, 64, 64, 2, 2, 128)
  monkeypatch.setattr(library, "fwd_workspace_bytes", lambda: 0)
  with pytest.raises(Exception, match="jax_flash_fwd: workspace"):
    jax.block_until_ready(
        jax.jit(lambda q, k, v: cuda.attention(q, k, v, _config(128),
                                               MaskArrays()))(q, k, v))
