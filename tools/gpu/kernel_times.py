"""Per-kernel GPU times of one attention call, for comparing implementations
kernel by kernel (preprocess, main kernel, convert; split and combine).

Runs one implementation of the benchmark harness on one case three times
under Nsight Compute, which records each kernel's duration, then prints one
line per kernel name: its launches and the time of its last launch.

  XLA_PYTHON_CLIENT_PREALLOCATE=false python3 tools/gpu/kernel_times.py \\
      --impl jax_flash_cuda --seq-len 1024 --causal --mode bwd

ncu serializes the kernels and leaves the clocks alone
(`--clock-control none`), so the absolute times are longer than in a
benchmark run (we have seen 2-3.5x on an H200); compare implementations
measured the same way, never these times with the benchmark's.
`--child` is the call that ncu profiles.
"""

from __future__ import annotations

import argparse
import collections
import csv
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
from typing import Optional

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

CALLS = 3
"""Calls of the compiled program; the last one's kernels are reported."""

MIN_MICROSECONDS = 2.0
"""Kernels shorter than this (input generation, casts) are left out."""


def _case(args: argparse.Namespace):
  from jax_flash.bench import cases  # pylint: disable=import-outside-toplevel
  if args.kind == "decode":
    return cases.Case("decode", args.batch or 4, 1, args.seq_len, 32, 8,
                      args.head_dim, False, page_size=args.page_size)
  return cases.training_cases((args.head_dim,), (args.seq_len,),
                              masks=(args.causal,))[0]


def run_child(args: argparse.Namespace) -> None:
  """Compiles the case's program and calls it CALLS times."""
  # pylint: disable=import-outside-toplevel
  import jax
  from jax_flash.bench import implementations, jax_runner
  case = _case(args)
  impl = implementations.by_name([args.impl])[0]
  compiled = jax_runner.compile_mode(impl.build(case), case, args.mode)
  inputs = jax_runner.make_inputs(case, 1, 0)[0]
  call_args = jax_runner.call_args(compiled, inputs, args.mode)
  jax.block_until_ready(call_args)
  for _ in range(CALLS):
    jax.block_until_ready(compiled.program(*call_args))
  print(f"{args.impl}: {case.label()} ({args.mode}), {CALLS} calls")


def summarize(log: pathlib.Path) -> list[tuple[str, int, float]]:
  """(kernel name, launches, microseconds of the last launch) per kernel of
  an ncu --csv log, in order of first launch."""
  with open(log, encoding="utf-8") as f:
    lines = [line for line in f if line.startswith('"')]
  times: dict[str, list[float]] = collections.OrderedDict()
  for row in csv.DictReader(lines):
    if row.get("Metric Name") != "gpu__time_duration.sum":
      continue
    value = float(row["Metric Value"].replace(",", ""))
    unit = row["Metric Unit"]
    scale = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0,
             "ms": 1e3, "msecond": 1e3}.get(unit)
    if scale is None:
      raise ValueError(f"unknown time unit {unit!r} in {log}")
    times.setdefault(row["Kernel Name"], []).append(value * scale)
  return [(name, len(t), t[-1]) for name, t in times.items()]


def find_ncu() -> Optional[str]:
  found = shutil.which("ncu")
  if found:
    return found
  installed = sorted(pathlib.Path("/opt/nvidia").glob("nsight-compute/*/ncu"))
  return str(installed[-1]) if installed else None


def main(argv: Optional[list[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--impl", default="jax_flash_cuda",
                      help="a name of jax_flash.bench's implementations")
  parser.add_argument("--kind", choices=("mha", "decode"), default="mha")
  parser.add_argument("--seq-len", type=int, default=4096,
                      help="S (mha, B * S = 16k tokens) or Sk (decode)")
  parser.add_argument("--head-dim", type=int, default=128)
  parser.add_argument("--batch", type=int, default=0,
                      help="decode only: B (default 4)")
  parser.add_argument("--page-size", type=int, default=0,
                      help="decode only: block size of a paged cache")
  parser.add_argument("--causal", action="store_true")
  parser.add_argument("--mode", choices=("fwd", "bwd", "fwd_bwd"),
                      default="bwd")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    run_child(args)
    return 0
  ncu = find_ncu()
  if ncu is None:
    print("ncu (Nsight Compute) not found", file=sys.stderr)
    return 2
  with tempfile.TemporaryDirectory() as tmp:
    log = pathlib.Path(tmp) / "ncu.csv"
    child = [sys.executable, __file__, "--child", *(argv or sys.argv[1:])]
    result = subprocess.run(
        [ncu, "--clock-control", "none", "--cache-control", "none",
         "--metrics", "gpu__time_duration.sum", "--csv", "--log-file",
         str(log), *child], env=os.environ, check=False)
    if result.returncode != 0 or not log.exists():
      print(f"ncu exited with {result.returncode}", file=sys.stderr)
      return 1
    rows = summarize(log)
  total = 0.0
  for name, launches, us in rows:
    if us < MIN_MICROSECONDS:
      continue
    total += us
    print(f"{us:10.1f} us  x{launches:<3d} {name[:110]}")
  print(f"{total:10.1f} us  all kernels of at least {MIN_MICROSECONDS} us "
        "(last launch each)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
