"""GPU check of the CUDA forward kernel: correctness against the float32
reference, then speed against PyTorch's FlashAttention-2 (sdpa flash backend).

Calls the handler directly, as jax_flash.cuda.lowering emits it (no
padding, batching or custom VJP: see kernel_calls.py), so it tests csrc/
alone. Needs a GPU, the built jax_flash/_lib/libjax_flash_cuda.so, and torch
for the timings, which go through jax_flash.bench (timing, FLOP counts and
PyTorch runner). JAX_FLASH_FORCE_ARCH=sm80 checks the sm80 kernels on a GPU
that would run sm90 ones.

  PYTHONPATH=. python3 tools/gpu/check_fwd.py [--skip-timing] [--log DIR]

Rule per case: err(kernel) <= 2 * err(reference in the input dtype) + atol,
errors measured against the float32 reference; out and lse both; every
output element finite (lse -inf exactly where the reference has -inf).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

import kernel_calls
from jax_flash.bench import cases as bench_cases
from jax_flash.bench import flops, implementations, timing, torch_runner
from jax_flash.config import AttentionConfig, MaskArrays
from jax_flash.cuda import instantiations, library
from jax_flash.reference import reference_attention


@dataclasses.dataclass
class Case:
  """One correctness case."""
  name: str
  b: int = 2
  sq: int = 257
  sk: int = 257
  h: int = 4
  hkv: int = 2
  d: int = 128
  dtype: str = "bfloat16"
  causal: bool = False
  window: tuple[int, int] = (-1, -1)
  softcap: float = 0.0
  alibi: bool = False
  segments: bool = False
  q_lengths: Optional[tuple[int, ...]] = None
  kv_lengths: Optional[tuple[int, ...]] = None


def make_inputs(c: Case, seed: int):
  rng = np.random.default_rng(seed)
  dt = jnp.dtype(c.dtype)
  q = jnp.asarray(rng.standard_normal((c.b, c.sq, c.h, c.d)), dt)
  k = jnp.asarray(rng.standard_normal((c.b, c.sk, c.hkv, c.d)), dt)
  v = jnp.asarray(rng.standard_normal((c.b, c.sk, c.hkv, c.d)), dt)
  cfg = AttentionConfig(softmax_scale=c.d ** -0.5, causal=c.causal,
                        window_left=c.window[0], window_right=c.window[1],
                        softcap=c.softcap)
  alibi = (jnp.asarray(rng.uniform(0.01, 0.5, (c.b, c.h)), jnp.float32)
           if c.alibi else None)
  qs = ks = None
  if c.segments:
    # Sorted ids with a few segments, as in packed sequences.
    qs = jnp.asarray(np.sort(rng.integers(0, 3, (c.b, c.sq)), 1), jnp.int32)
    ks = jnp.asarray(np.sort(rng.integers(0, 3, (c.b, c.sk)), 1), jnp.int32)
  ql = None if c.q_lengths is None else jnp.asarray(c.q_lengths, jnp.int32)
  kl = None if c.kv_lengths is None else jnp.asarray(c.kv_lengths, jnp.int32)
  masks = MaskArrays(alibi_slopes=alibi, q_segment_ids=qs, kv_segment_ids=ks,
                     q_lengths=ql, kv_lengths=kl)
  return q, k, v, cfg, masks


def poison(nbytes: int) -> None:
  """Fills and frees a NaN buffer of nbytes, so that the allocator is likely
  to hand that memory to the next call's outputs."""
  x = jnp.full((nbytes // 4 + 1,), jnp.nan, jnp.float32)
  x.block_until_ready()
  del x


def check(c: Case, seed: int) -> dict:
  q, k, v, cfg, masks = make_inputs(c, seed)
  f32 = lambda x: x.astype(jnp.float32)
  with jax.default_matmul_precision("highest"):
    ref_out, ref_lse = jax.jit(reference_attention, static_argnums=3)(
        f32(q), f32(k), f32(v), cfg, masks)
    low_out, low_lse = jax.jit(
        lambda *a: reference_attention(*a, upcast=False),
        static_argnums=3)(q, k, v, cfg, masks)
  fn = jax.jit(kernel_calls.forward, static_argnums=3)
  fn(q, k, v, cfg, masks)  # compile before poisoning
  poison(q.size * 2 * 2 + c.b * c.h * c.sq * 4)
  out, lse = fn(q, k, v, cfg, masks)
  out = np.asarray(out.astype(jnp.float32))
  lse = np.asarray(lse)
  ref_out, ref_lse = np.asarray(ref_out), np.asarray(ref_lse)
  finite = bool(np.all(np.isfinite(out)))
  lse_ok = bool(np.all(np.isfinite(lse) | (np.isneginf(lse) &
                                           np.isneginf(ref_lse))))
  lse_inf_match = bool(np.array_equal(np.isneginf(lse), np.isneginf(ref_lse)))
  e_out = kernel_calls.max_abs_err(out, ref_out)
  e_low = kernel_calls.max_abs_err(np.asarray(low_out.astype(jnp.float32)), ref_out)
  e_lse = kernel_calls.max_abs_err(lse, ref_lse)
  e_lse_low = kernel_calls.max_abs_err(np.asarray(low_lse), ref_lse)
  ok = (finite and lse_ok and lse_inf_match and e_out <= 2 * e_low + 1e-5 and
        e_lse <= 2 * e_lse_low + 1e-4)
  return dict(name=c.name, ok=ok, err_out=e_out, err_out_lowp=e_low,
              err_lse=e_lse, err_lse_lowp=e_lse_low, finite=finite,
              lse_inf_match=lse_inf_match)


def cases() -> list[Case]:
  out = []
  for d in instantiations.HEAD_DIMS:
    for causal in (False, True):
      out.append(Case(f"d{d} causal={causal}", d=d, causal=causal))
  out.append(Case("fp16 d64", d=64, dtype="float16"))
  out.append(Case("fp16 d128 causal", d=128, dtype="float16", causal=True))
  for sq, sk in ((1, 1), (1, 17), (17, 1), (17, 113), (113, 17),
                 (257, 1000), (1000, 257), (1000, 1000)):
    for causal in (False, True):
      out.append(Case(f"sq{sq} sk{sk} causal={causal}", b=1, sq=sq, sk=sk,
                      causal=causal))
  m = dict(b=2, sq=300, sk=500, d=64)
  out += [
      Case("window(64,32)", window=(64, 32), **m),
      Case("window(100,-1)", window=(100, -1), **m),
      Case("window(-1,0)+causal sq>sk", b=2, sq=500, sk=300, d=64,
           causal=True),
      Case("softcap30", softcap=30.0, **m),
      Case("alibi", alibi=True, **m),
      Case("alibi causal", alibi=True, causal=True, **m),
      Case("segments", segments=True, **m),
      Case("lengths", q_lengths=(250, 1), kv_lengths=(499, 0), **m),
      Case("lengths causal", q_lengths=(250, 300), kv_lengths=(100, 500),
           causal=True, **m),
      Case("everything", softcap=20.0, alibi=True, segments=True,
           window=(128, 16), q_lengths=(280, 200), kv_lengths=(480, 300), **m),
      Case("gqa 8:1", h=8, hkv=1, **m),
      Case("gqa 8:8 d128 causal", h=8, hkv=8, d=128, causal=True, b=1,
           sq=777, sk=777),
  ]
  return out


def _input_bytes(b: int, s: int, h: int, d: int) -> int:
  """Bytes of one set of bf16 q, k, v."""
  return 3 * b * s * h * d * 2


def time_kernel(b: int, s: int, h: int, d: int, causal: bool,
                once: bool = False) -> Optional[timing.Timing]:
  """The custom call timed by jax_flash.bench.timing, over rotated input
  sets; with `once`, a single call (for a profiler) and None."""
  config = AttentionConfig(softmax_scale=d ** -0.5, causal=causal)
  fn = jax.jit(lambda q, k, v: kernel_calls.forward(q, k, v, config,
                                                    MaskArrays())[0])
  shape = (b, s, h, d)
  sets = []
  for seed in range(1 if once else timing.input_sets_needed(
      _input_bytes(b, s, h, d))):
    keys = jax.random.split(jax.random.key(seed), 3)
    sets.append([jax.random.normal(key, shape, jnp.bfloat16) for key in keys])
  if once:
    fn(*sets[0]).block_until_ready()
    return None
  return timing.time_calls(lambda i: fn(*sets[i % len(sets)]),
                           jax.block_until_ready)


def time_torch(b: int, s: int, h: int, d: int, causal: bool,
               once: bool = False) -> Optional[timing.Timing]:
  """PyTorch SDPA's FlashAttention-2 backend on the same problem, through
  jax_flash.bench's runner; with `once`, three calls and None."""
  impl = implementations.by_name(["torch_flash"])[0]
  case = bench_cases.Case("mha", b, s, s, h, h, d, causal)
  options = dict(rounds=1, calls=1, warmup=1) if once else {}
  n_sets = 1 if once else timing.input_sets_needed(_input_bytes(b, s, h, d))
  result, _, _ = torch_runner.measure(impl, case, "fwd", n_sets, 0, **options)
  return None if once else result


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--skip-timing", action="store_true")
  parser.add_argument("--timing-only", action="store_true")
  parser.add_argument("--profile-once", action="store_true",
                      help="run each timing case once (torch: three calls), "
                      "for ncu")
  parser.add_argument("--log", type=pathlib.Path, default=None)
  parser.add_argument("--lib", type=pathlib.Path,
                      default=library.library_path())
  args = parser.parse_args()
  info = kernel_calls.load(args.lib).build_info
  print("build:", info, "device:", jax.devices()[0].device_kind, flush=True)
  results = []
  for i, c in enumerate([] if args.timing_only else cases()):
    dt = "bf16" if c.dtype == "bfloat16" else "fp16"
    if not info.kernel_archs("fwd", dt, c.d):
      continue
    try:
      r = check(c, seed=i)
    except Exception as e:  # pylint: disable=broad-except
      r = dict(name=c.name, ok=False, error=repr(e)[:300])
    results.append(r)
    print(json.dumps(r), flush=True)
  n_ok = sum(r["ok"] for r in results)
  timings = []
  if not args.skip_timing:
    # D 128 with 16 heads over S 1k..16k (batch * S = 16k tokens); D 64
    # and 256 at S 4k with heads * D = 2048.
    configs = [(16384 // s, s, 16, 128) for s in (1024, 4096, 16384)]
    configs += [(4, 4096, 32, 64), (4, 4096, 8, 256)]
    for b, s, h, d in configs:
      for causal in (False, True):
        ours = time_kernel(b, s, h, d, causal, once=args.profile_once)
        theirs = time_torch(b, s, h, d, causal, once=args.profile_once)
        if args.profile_once:
          continue
        ours, theirs = ours.seconds, theirs.seconds
        fl = flops.attention_flops(b, h, s, s, d, causal=causal)
        timings.append(dict(s=s, b=b, h=h, d=d, causal=causal,
                            ours_ms=ours * 1e3, fa2_ms=theirs * 1e3,
                            ours_tflops=fl / ours / 1e12,
                            fa2_tflops=fl / theirs / 1e12,
                            ratio=theirs / ours))
        print(json.dumps(timings[-1]), flush=True)
  if args.log:
    args.log.mkdir(parents=True, exist_ok=True)
    (args.log / "check_fwd.json").write_text(
        json.dumps(dict(build=str(info), results=results, timings=timings),
                   indent=1))
  print("\nfailed:", [r["name"] for r in results if not r["ok"]])
  print(f"correctness: {n_ok}/{len(results)} passed")
  if timings:
    print(f"{'D':>4} {'H':>3} {'S':>6} {'B':>3} {'causal':>6} {'ours ms':>8} "
          f"{'FA2 ms':>8} {'ours TF/s':>9} {'FA2 TF/s':>9} {'ratio':>6}")
    for t in timings:
      print(f"{t['d']:>4} {t['h']:>3} {t['s']:>6} {t['b']:>3} "
            f"{str(t['causal']):>6} "
            f"{t['ours_ms']:8.3f} {t['fa2_ms']:8.3f} {t['ours_tflops']:9.1f} "
            f"{t['fa2_tflops']:9.1f} {t['ratio']:6.2f}")
  # A run that checked nothing (no kernel built for any case) fails too.
  sys.exit(0 if results and n_ok == len(results) else 1)


if __name__ == "__main__":
  main()
