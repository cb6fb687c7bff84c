"""Small forward + backward calls of the CUDA kernels, for compute-sanitizer.

Run under `compute-sanitizer --tool memcheck` (or racecheck with --small) to
check every kernel of the forward and backward passes on shapes with ragged
tiles, GQA, every mask, alibi with its gradient, softcap and deterministic
mode, and short queries (the decoding kernel's forward when
on unless JAX_FLASH_DECODE_KERNEL=0; the sm90 forward on an sm90 GPU):

  XLA_PYTHON_CLIENT_PREALLOCATE=false compute-sanitizer --tool memcheck \
      --kernel-name kns=flash python3 tools/gpu/sanitize_cases.py
"""

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jax_flash import cuda  # noqa: E402
from jax_flash.config import AttentionConfig, MaskArrays  # noqa: E402
from jax_flash.cuda import decode, library  # noqa: E402


def _built(d: int) -> bool:
  """Whether the loaded library has a bf16 kernel for head dim d (a
  development build may have a few head dims only)."""
  if library.kernel_head_dim("bf16", d) is None:
    print(f"skipped head dim {d}: not in this build", flush=True)
    return False
  return True


def _decode_built(d: int) -> bool:
  """Whether the loaded library has the bf16 decoding kernel at head dim d
  (the K/V-cache API's `implementation="cuda"` needs it exactly)."""
  if not decode.built(jnp.bfloat16, d):
    print(f"skipped decoding at head dim {d}: not in this build", flush=True)
    return False
  return True


def _case(seed, batch, sq, sk, heads, kv_heads, d, config, masks):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (batch, sq, heads, d), jnp.bfloat16)
  k = jax.random.normal(keys[1], (batch, sk, kv_heads, d), jnp.bfloat16)
  v = jax.random.normal(keys[2], (batch, sk, kv_heads, d), jnp.bfloat16)

  def loss(q, k, v, slopes):
    m = masks if slopes is None else masks._replace(alibi_slopes=slopes)
    out, lse = cuda.attention(q, k, v, config, m)
    return jnp.sum(out.astype(jnp.float32) ** 2) + jnp.sum(
        jnp.where(jnp.isfinite(lse), lse, 0.0))

  slopes = masks.alibi_slopes
  argnums = (0, 1, 2) if slopes is None else (0, 1, 2, 3)
  grads = jax.jit(jax.grad(loss, argnums=argnums))(q, k, v, slopes)
  for g in grads:
    if not bool(jnp.all(jnp.isfinite(g))):
      raise AssertionError("non-finite gradient")
  return grads


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--small", action="store_true",
                      help="one small case per head dim (for racecheck)")
  args = parser.parse_args()
  # Enough keys for several K/V tiles: pipelines wrap and the sm90
  # forward runs its masked and unmasked loops.
  batch, sq, sk = (1, 70, 300) if args.small else (2, 77, 390)
  rng = np.random.default_rng(0)
  lengths = MaskArrays(
      q_lengths=jnp.asarray([sq, sq // 2][:batch], jnp.int32),
      kv_lengths=jnp.asarray([sk, sk // 2][:batch], jnp.int32))
  segments = MaskArrays(
      q_segment_ids=jnp.asarray(np.sort(rng.integers(0, 3, (batch, sq))),
                                jnp.int32),
      kv_segment_ids=jnp.asarray(np.sort(rng.integers(0, 3, (batch, sk))),
                                 jnp.int32))
  alibi = MaskArrays(alibi_slopes=jnp.asarray(
      rng.uniform(0.01, 0.5, (batch, 4)), jnp.float32))
  cases = [
      ("plain d64", 64, AttentionConfig(0.125), MaskArrays()),
      ("causal d128", 128, AttentionConfig(128 ** -0.5, causal=True),
       MaskArrays()),
      ("window+lengths d128", 128,
       AttentionConfig(128 ** -0.5, window_left=20, window_right=5), lengths),
      ("segments d128 deterministic", 128,
       AttentionConfig(128 ** -0.5, deterministic=True), segments),
      ("alibi+softcap d256", 256,
       AttentionConfig(0.0625, causal=True, softcap=5.0), alibi),
      ("alibi+softcap d128 deterministic", 128,
       AttentionConfig(128 ** -0.5, softcap=5.0, deterministic=True), alibi),
      # One block of a larger problem (a ring step): the window cuts it by
      # global positions, away from the block's own diagonal.
      ("window+alibi position offsets d128", 128,
       AttentionConfig(128 ** -0.5, causal=True, window_left=150),
       alibi._replace(q_offset=jnp.int32(400), kv_offset=jnp.int32(200))),
      # The sm90 backward's split-D schedule with its deterministic dalibi.
      ("alibi+segments d256 deterministic", 256,
       AttentionConfig(0.0625, deterministic=True),
       segments._replace(alibi_slopes=alibi.alibi_slopes)),
      # No mask but lengths: the sm90 forward's plain variant, with 80-key
      # tiles at D = 256.
      ("lengths d128", 128, AttentionConfig(128 ** -0.5), lengths),
      ("lengths d256", 256, AttentionConfig(0.0625), lengths),
      # The sm90 backward between the powers of two: 128 keys a CTA at
      # D = 96; split-D with 64-byte swizzled rows at D = 192.
      ("causal+lengths d96", 96, AttentionConfig(96 ** -0.5, causal=True),
       lengths),
      ("alibi+segments d192 deterministic", 192,
       AttentionConfig(192 ** -0.5, causal=True, deterministic=True),
       segments._replace(alibi_slopes=alibi.alibi_slopes)),
      # Split-D with 32-byte swizzled rows at D = 160 and 224 (one Q/dO
      # stage at 224).
      ("window+lengths d160", 160,
       AttentionConfig(160 ** -0.5, window_left=40, window_right=10),
       lengths),
      ("alibi+softcap d224 deterministic", 224,
       AttentionConfig(224 ** -0.5, causal=True, softcap=5.0,
                       deterministic=True), alibi),
      # The sm90 forward's three consumer warpgroups (D = 64, plain
      # variant: 192-row tiles), ragged lengths.
      ("lengths d64", 64, AttentionConfig(0.125), lengths),
  ]
  if args.small:  # all but the two D = 128 mask cases above
    cases = [c for i, c in enumerate(cases) if i not in (2, 3)]
  for name, d, config, masks in cases:
    if not _built(d):
      continue
    _case(0, batch, sq, sk, 4, 2, d, config, masks)
    print(f"ran {name}", flush=True)
  # More work tiles (5 x 32 x 2 = 320) than SMs: the persistent sm90
  # forward's CTAs take several each, and with Sq > Sk under a causal mask
  # the first tiles see no key.
  if _built(128):
    _case(2, 2, 600, 300, 32, 8, 128,
          AttentionConfig(128 ** -0.5, causal=True),
          MaskArrays(kv_lengths=jnp.asarray([300, 170], jnp.int32)))
    print("ran persistent causal sq>sk d128", flush=True)
    _case(2, 2, 600, 300, 32, 8, 128, AttentionConfig(128 ** -0.5),
          MaskArrays(kv_lengths=jnp.asarray([300, 170], jnp.int32)))
    print("ran persistent unmasked d128", flush=True)
  # The same at D = 64, where the plain variant's three consumer warpgroups
  # take turns across several tiles per CTA (4 x 32 x 2 = 256 tiles of 192
  # rows), the first ones without keys.
  if _built(64):
    _case(2, 2, 600, 300, 32, 8, 64, AttentionConfig(0.125, causal=True),
          MaskArrays(kv_lengths=jnp.asarray([300, 170], jnp.int32)))
    print("ran persistent causal sq>sk d64", flush=True)
  # Short queries: the decoding kernel's forward (unless
  # JAX_FLASH_DECODE_KERNEL=0), split over the keys, 16 and 64 rows per CTA.
  decode_cases = [
      ("decode sq1 d128", 1, 128, 4, AttentionConfig(128 ** -0.5)),
      ("decode sq4 gqa8 causal d128", 4, 128, 8,
       AttentionConfig(128 ** -0.5, causal=True, softcap=5.0)),
      ("decode sq2 d256 window", 2, 256, 2,
       AttentionConfig(0.0625, window_left=300)),
  ]
  for name, q_len, d, group, config in decode_cases[:2 if args.small else 3]:
    if not _built(d):
      continue
    _case(1, 2, q_len, 1500, 2 * group, 2, d, config,
          MaskArrays(kv_lengths=jnp.asarray([1500, 777], jnp.int32)))
    print(f"ran {name}", flush=True)
  # A paged cache (bulk copies on sm_90): ragged lengths, blocks in a
  # shuffled order, and one block id out of range (read as an empty block).
  if _decode_built(128):
    _paged_case(3)
    print("ran decode paged block16 d128", flush=True)


def _paged_case(seed):
  import jax_flash  # pylint: disable=import-outside-toplevel
  keys = jax.random.split(jax.random.key(seed), 3)
  pool, block, batch, blocks_per_row = 48, 16, 2, 20
  q = jax.random.normal(keys[0], (batch, 1, 8, 128), jnp.bfloat16)
  k = jax.random.normal(keys[1], (pool, block, 2, 128), jnp.bfloat16)
  v = jax.random.normal(keys[2], (pool, block, 2, 128), jnp.bfloat16)
  table = np.random.default_rng(seed).permutation(pool)[
      :batch * blocks_per_row].reshape(batch, blocks_per_row)
  table[1, 2] = pool + 5
  out = jax_flash.flash_attention_with_kv_cache(
      q, k, v, cache_seq_lengths=jnp.asarray([300, 77], jnp.int32),
      block_table=jnp.asarray(table, jnp.int32), implementation="cuda").out
  if not bool(jnp.all(jnp.isfinite(out.astype(jnp.float32)))):
    raise AssertionError("non-finite decoding output")


if __name__ == "__main__":
  main()
