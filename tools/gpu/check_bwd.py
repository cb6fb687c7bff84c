"""Checks and times the CUDA backward kernels through `jax_flash_bwd` itself.

The handlers are registered from a built library by jax_flash's loader and
called as jax_flash.cuda.lowering emits them, without jax_flash's primitives
(kernel_calls.py), so a failure here points at csrc/. out and lse come from
the library's forward when it has one, else from the float32 reference.
Gradients are held to FlashAttention's rule against `jax.vjp` of the float32
reference: err <= 2 * err(reference in the input dtype) + atol *
max|reference gradient|. JAX_FLASH_FORCE_ARCH=sm80 checks the sm80 kernels
on a GPU that would run sm90 ones.

Run on a GPU machine, from the repository root:
  PYTHONPATH=. python3 tools/gpu/check_bwd.py [--library PATH] [--out DIR]
    [--skip-timing]
Prints one line per check, then a timing table against PyTorch SDPA's
FlashAttention-2 backend (timing, FLOP counts and the PyTorch runner of
jax_flash.bench); writes the full log to DIR/check_bwd.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

import kernel_calls
from jax_flash.bench import flops, timing
from jax_flash.config import AttentionConfig, MaskArrays
from jax_flash.cuda import instantiations
from jax_flash.cuda import library as cuda_library
from jax_flash.reference import reference_attention

ATOL = {jnp.bfloat16: 1e-3, jnp.float16: 1e-4}
"""Absolute slack per unit of the largest reference gradient."""


@dataclasses.dataclass(frozen=True)
class Problem:
  """One backward problem: shapes, dtype and which masks are on."""

  batch: int
  q_len: int
  kv_len: int
  heads: int
  kv_heads: int
  head_dim: int
  dtype: Any = jnp.bfloat16
  causal: bool = False
  window: tuple[int, int] = (-1, -1)
  softcap: float = 0.0
  alibi: bool = False
  segments: bool = False
  lengths: bool = False
  deterministic: bool = False

  def label(self) -> str:
    """A short name for the log."""
    parts = [f"B{self.batch} Sq{self.q_len} Sk{self.kv_len} "
             f"H{self.heads}/{self.kv_heads} D{self.head_dim} "
             f"{jnp.dtype(self.dtype).name}"]
    for flag in ("causal", "alibi", "segments", "lengths", "deterministic"):
      if getattr(self, flag):
        parts.append(flag)
    if self.window != (-1, -1):
      parts.append(f"window{self.window}")
    if self.softcap:
      parts.append(f"softcap{self.softcap:g}")
    return " ".join(parts)

  def config(self) -> AttentionConfig:
    """The static options of this problem."""
    return AttentionConfig(softmax_scale=self.head_dim ** -0.5,
                           causal=self.causal, window_left=self.window[0],
                           window_right=self.window[1], softcap=self.softcap,
                           deterministic=self.deterministic)


def has_forward(library: cuda_library.Library) -> bool:
  """Whether the library has the forward kernel the timed problems use."""
  return bool(library.build_info.kernel_archs("fwd", "bf16", 128))


def make_inputs(problem: Problem, seed: int):
  """Fresh q, k, v, dout and masks for `problem`."""
  rng = np.random.default_rng(seed)
  p = problem
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), p.dtype)
  q = normal(p.batch, p.q_len, p.heads, p.head_dim)
  k = normal(p.batch, p.kv_len, p.kv_heads, p.head_dim)
  v = normal(p.batch, p.kv_len, p.kv_heads, p.head_dim)
  dout = normal(p.batch, p.q_len, p.heads, p.head_dim)
  ids = lambda s: jnp.asarray(
      np.sort(rng.integers(0, 3, (p.batch, s)), axis=1), jnp.int32)
  masks = MaskArrays(
      alibi_slopes=(jnp.asarray(rng.uniform(0.01, 0.5, (p.batch, p.heads)),
                                jnp.float32) if p.alibi else None),
      q_segment_ids=ids(p.q_len) if p.segments else None,
      kv_segment_ids=ids(p.kv_len) if p.segments else None,
      q_lengths=(jnp.asarray(rng.integers(1, p.q_len + 1, (p.batch,)),
                             jnp.int32) if p.lengths else None),
      kv_lengths=(jnp.asarray(rng.integers(1, p.kv_len + 1, (p.batch,)),
                              jnp.int32) if p.lengths else None))
  return q, k, v, dout, masks


def reference_grads(q, k, v, dout, config, masks, upcast: bool):
  """(dq, dk, dv, dalibi) of <dout, out> by autodiff of the reference."""
  cast = (lambda x: x.astype(jnp.float32)) if upcast else (lambda x: x)

  def out_of(q, k, v, slopes):
    out, _ = reference_attention(q, k, v, config,
                                 masks._replace(alibi_slopes=slopes),
                                 upcast=upcast)
    return out.astype(jnp.float32)

  _, vjp = jax.vjp(out_of, cast(q), cast(k), cast(v), masks.alibi_slopes)
  return vjp(dout.astype(jnp.float32))


def check(problem: Problem, seed: int,
          use_forward: bool = False) -> dict[str, Any]:
  """Runs one problem; returns errors, budgets and the verdict.

  out and lse come from the float32 reference, or with `use_forward` from
  the library's forward kernel.
  """
  q, k, v, dout, masks = make_inputs(problem, seed)
  config = problem.config()
  if use_forward:
    out, lse = jax.jit(kernel_calls.forward, static_argnums=3)(
        q, k, v, config, masks)
  else:
    out, lse = reference_attention(q, k, v, config, masks)
  run = jax.jit(lambda *a: kernel_calls.backward(*a, config, masks))
  got = run(q, k, v, out, dout, lse)
  grads = jax.jit(reference_grads, static_argnames=("config", "upcast"))
  exact = grads(q, k, v, dout, config=config, masks=masks, upcast=True)
  lowp = grads(q, k, v, dout, config=config, masks=masks, upcast=False)
  record: dict[str, Any] = {
      "problem": problem.label() + (" +fwd kernel" if use_forward else ""),
      "ok": True}
  for name, a, e, l in zip(("dq", "dk", "dv", "dalibi"), got, exact, lowp):
    if e is None:
      continue
    atol = ATOL[jnp.dtype(problem.dtype).type] * max(
        1.0, float(jnp.max(jnp.abs(e))))
    err, budget = kernel_calls.max_abs_err(a, e), 2 * kernel_calls.max_abs_err(l, e) + atol
    record[name] = (err, budget)
    record["ok"] &= err <= budget
  if problem.deterministic:
    again = run(q, k, v, out, dout, lse)
    same = all(bool(jnp.array_equal(a, b)) for a, b in zip(got, again)
               if a.size)
    record["bitwise_repeat"] = same
    record["ok"] &= same
  return record


def problems() -> list[Problem]:
  """The correctness grid: awkward sizes, every mask, GQA, dtypes, dims."""
  out = []
  for sq, sk in ((1, 1), (17, 17), (113, 257), (257, 113), (1000, 1000),
                 (1, 1000), (1000, 17)):
    for causal in (False, True):
      out.append(Problem(2, sq, sk, 4, 4, 128, causal=causal))
  for kv_heads in (1, 2, 8):
    out.append(Problem(2, 300, 200, 8, kv_heads, 128, causal=True))
  # Every other head dim (128 is above).
  for d in (d for d in instantiations.HEAD_DIMS if d != 128):
    out.append(Problem(2, 200, 333, 4, 2, d, causal=True))
  out += [
      Problem(2, 257, 300, 4, 2, 128, dtype=jnp.float16),
      Problem(2, 257, 300, 4, 2, 64, dtype=jnp.float16, causal=True),
      Problem(2, 300, 300, 4, 2, 128, window=(50, 20)),
      Problem(2, 300, 500, 4, 2, 128, window=(100, -1)),
      Problem(2, 300, 300, 4, 4, 128, softcap=5.0, causal=True),
      Problem(2, 300, 300, 4, 2, 128, alibi=True, causal=True),
      Problem(2, 300, 300, 4, 2, 128, alibi=True, softcap=5.0),
      Problem(2, 300, 260, 4, 2, 128, segments=True),
      Problem(3, 300, 260, 4, 2, 128, lengths=True, causal=True),
      Problem(3, 300, 260, 4, 2, 128, lengths=True, segments=True,
              alibi=True, window=(64, 8)),
      Problem(2, 600, 700, 8, 2, 128, causal=True, deterministic=True),
      Problem(2, 600, 700, 8, 1, 128, alibi=True, lengths=True,
              deterministic=True),
      Problem(1, 1000, 1000, 4, 4, 64, deterministic=True),
      # D = 256: the split-D schedule of the sm90 backward.
      Problem(2, 113, 257, 4, 4, 256),
      Problem(2, 257, 113, 4, 2, 256, dtype=jnp.float16, causal=True),
      Problem(2, 300, 300, 4, 2, 256, alibi=True, softcap=5.0, causal=True),
      Problem(3, 300, 260, 4, 2, 256, lengths=True, segments=True,
              alibi=True, window=(64, 8)),
      Problem(2, 600, 700, 8, 2, 256, causal=True, deterministic=True),
      Problem(2, 600, 700, 8, 1, 256, alibi=True, lengths=True,
              deterministic=True),
  ]
  return out


def _time_jax(fn, args_sets) -> timing.Timing:
  return timing.time_calls(lambda i: fn(*args_sets[i % len(args_sets)]),
                           jax.block_until_ready)


def bench(library: cuda_library.Library, seq_len: int, causal: bool,
          torch_impls: Optional[list]) -> dict[str, Any]:
  """Times bwd and fwd+bwd at D=128, 16 heads, B*S = 16k tokens."""
  batch, heads, d = max(1, 16384 // seq_len), 16, 128
  problem = Problem(batch, seq_len, seq_len, heads, heads, d, causal=causal)
  config = problem.config()
  sets = []
  per_set = 4 * batch * seq_len * heads * d * 2
  for s in range(timing.input_sets_needed(per_set)):
    q, k, v, dout, masks = make_inputs(problem, s)
    sets.append((q, k, v, dout))
  fwd = jax.jit(lambda q, k, v: kernel_calls.forward(q, k, v, config, masks))
  bwd = jax.jit(lambda q, k, v, o, do, lse: kernel_calls.backward(
      q, k, v, o, do, lse, config, masks)[:3])

  def fwd_bwd(q, k, v, do):
    out, lse = kernel_calls.forward(q, k, v, config, masks)
    return kernel_calls.backward(q, k, v, out, do, lse, config, masks)[:3]

  bwd_sets = []
  for q, k, v, do in sets:
    out, lse = (fwd(q, k, v) if has_forward(library)
                else reference_attention(q, k, v, config, masks))
    bwd_sets.append((q, k, v, out, do, lse))
  row: dict[str, Any] = {"S": seq_len, "B": batch, "causal": causal}
  work = {mode: flops.attention_flops(batch, heads, seq_len, seq_len, d,
                                      causal=causal, mode=mode)
          for mode in ("bwd", "fwd_bwd")}
  t = _time_jax(bwd, bwd_sets)
  row["bwd_ms"] = t.seconds * 1e3
  row["bwd_tflops"] = work["bwd"] / t.seconds / 1e12
  row["bwd_spread"] = t.spread
  if has_forward(library):
    t = _time_jax(jax.jit(fwd_bwd), sets)
    row["fwd_bwd_ms"] = t.seconds * 1e3
    row["fwd_bwd_tflops"] = work["fwd_bwd"] / t.seconds / 1e12
  if torch_impls:
    # pylint: disable-next=import-outside-toplevel
    from jax_flash.bench import cases, torch_runner
    case = cases.Case("mha", batch, seq_len, seq_len, heads, heads, d, causal)
    for mode in ("bwd", "fwd_bwd"):
      t, _, _ = torch_runner.measure(torch_impls[0], case, mode,
                                     timing.input_sets_needed(per_set), 0)
      row[f"torch_{mode}_ms"] = t.seconds * 1e3
      row[f"torch_{mode}_tflops"] = work[mode] / t.seconds / 1e12
  return row


def main(argv: Optional[list[str]] = None) -> int:
  """Command line; returns the exit status (1 if a check failed)."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--library", type=pathlib.Path,
                      default=cuda_library.library_path())
  parser.add_argument("--out", type=pathlib.Path, default=None)
  parser.add_argument("--skip-timing", action="store_true")
  parser.add_argument("--no-torch", action="store_true",
                      help="time jax_flash only (e.g. under a profiler)")
  parser.add_argument("--seq-lens", default="1024,4096,16384")
  parser.add_argument("--checks", default=":",
                      help="checks to run: a slice of the list (26: or :0) "
                      "or comma-separated indices")
  args = parser.parse_args(argv)
  library = kernel_calls.load(args.library)
  print(f"device: {jax.devices()[0].device_kind}; forward from "
        f"{'the library' if has_forward(library) else 'the reference'}",
        flush=True)
  records, failures = [], 0
  todo = [(problem, False) for problem in problems()]
  if has_forward(library):
    todo += [(Problem(2, 1000, 1000, 4, 4, 128, causal=causal), True)
             for causal in (False, True)]
  numbered = list(enumerate(todo))
  if ":" in args.checks:
    start, _, stop = args.checks.partition(":")
    numbered = numbered[slice(int(start) if start else None,
                              int(stop) if stop else None)]
  else:
    numbered = [numbered[int(i)] for i in args.checks.split(",")]
  skipped = 0
  for seed, (problem, use_forward) in numbered:
    dtype = "bf16" if problem.dtype == jnp.bfloat16 else "fp16"
    if problem.head_dim not in library.build_info.head_dims(dtype):
      # A development build may have a few head dims only.
      skipped += 1
      print(f"skip {problem.label()}: not in this build", flush=True)
      continue
    try:
      record = check(problem, seed, use_forward)
    except Exception as e:  # pylint: disable=broad-except
      record = {"problem": problem.label(), "ok": False, "error": repr(e)}
    records.append(record)
    failures += not record["ok"]
    detail = " ".join(f"{name} {v[0]:.3g}/{v[1]:.3g}"
                      for name, v in record.items()
                      if isinstance(v, tuple))
    print(f"{'ok  ' if record['ok'] else 'FAIL'} {record['problem']}: "
          f"{detail} {record.get('error', '')}"
          f"{' bitwise' if record.get('bitwise_repeat') else ''}", flush=True)
  rows = []
  if not args.skip_timing:
    torch_impls = None
    try:
      # pylint: disable-next=import-outside-toplevel
      from jax_flash.bench import implementations
      if not args.no_torch:
        torch_impls = implementations.by_name(["torch_flash"])
    except Exception:  # pylint: disable=broad-except
      pass
    for seq_len in (int(s) for s in args.seq_lens.split(",")):
      for causal in (False, True):
        rows.append(bench(library, seq_len, causal, torch_impls))
  if args.out is not None:
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "check_bwd.json").write_text(
        json.dumps({"checks": records, "timing": rows}, indent=1,
                   default=str))
  print(f"\n{len(records) - failures}/{len(records)} checks passed"
        f"{f' ({skipped} skipped: head dims not built)' if skipped else ''}")
  if not records:
    print("nothing was checked")
    return 1
  if rows:
    keys = [k for k in rows[0] if not k.endswith("spread")]
    print(" | ".join(keys))
    for row in rows:
      print(" | ".join(f"{row.get(k, float('nan')):.4g}"
                       if isinstance(row.get(k), float) else str(row.get(k))
                       for k in keys))
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
