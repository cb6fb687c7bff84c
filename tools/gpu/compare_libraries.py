"""A kernel change against its baseline: the benchmark run with two builds of
the CUDA library, one after the other on the same GPU, so that both see the
same clocks, driver and Python (runs on different days move by several
percent; see docs/performance.md).

Each build runs in its own process (`JAX_FLASH_CUDA_LIBRARY` picks the file)
through `python -m jax_flash.bench`; the implementations in `--others` run in
the second process only, so the table also gives the new build's ratio to
the best of them, measured in the same run:

  PYTHONPATH=. python3 tools/gpu/compare_libraries.py base.so new.so \\
      --out /tmp/ab --others jax_cudnn -- --kinds decode \\
      --in-program-calls 20 --rounds 2 --calls 10

With `--abba` the builds run base, new, new, base (the implementations in
`--others` with the first new run) and each build's value is the mean of its
two runs: the second of two back-to-back processes has measured up to 10%
faster at 1k tokens on an H200, which a plain base-then-new order credits to
the new build. The table then also gives each build's two runs.

Several builds under test (`base.so a.so b.so ...`) run in one order, the
palindrome base, a, b, ..., b, a, base with `--abba` (else base, a, b, ...),
and comparison.md holds one table per build against the base, each with the
best of `--others` (run with the first run of the first build under test).

Arguments after `--` go to the benchmark as they are (not --impls, --out or
--no-plots, which this script sets). The table is TFLOP/s, GB/s for
decoding cases.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
from typing import Any, Optional

Record = dict[str, Any]


def metric(record: Record) -> tuple[str, Optional[float]]:
  """(unit, value) of a benchmark record: GB/s for decoding, else TFLOP/s;
  None unless the record ran."""
  unit, key = (("GB/s", "gbps") if record["case"]["kind"] == "decode"
               else ("TFLOP/s", "tflops"))
  value = record.get(key) if record.get("status") == "ok" else None
  return unit, value


def problem(record: Record) -> tuple:
  """What a record measured, whatever implementation measured it."""
  return (tuple(sorted(record["case"].items())), record["mode"])


def compare(base: list[Record], new: list[Record], impl: str,
            base_runs: Optional[list[list[Record]]] = None,
            new_runs: Optional[list[list[Record]]] = None) -> list[dict]:
  """One row per problem of `impl` in `new`: its value in both builds, and
  the best value of any other implementation in `new` (None where none
  ran). With several runs of a build (`base_runs`, `new_runs`), a build's
  value is the mean of its runs' values and the row also holds each run's."""
  def best(records, wanted):
    """The highest value per problem among the wanted implementations'
    records (None for a problem none of them ran)."""
    out: dict[tuple, Optional[float]] = {}
    for r in records:
      if not wanted(r["impl"]):
        continue
      key, v = problem(r), metric(r)[1]
      if key not in out or (v is not None and
                            (out[key] is None or v > out[key])):
        out[key] = v
    return out

  def runs_of(runs):
    """Per problem, the values of `impl` in each run (None where it did not
    run)."""
    per_run = [best(records, lambda name: name == impl) for records in runs]
    keys = {key for values in per_run for key in values}
    return {key: [values.get(key) for values in per_run] for key in keys}

  def mean(values):
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if len(known) == len(values) else None

  base_all = runs_of(base_runs or [base])
  new_all = runs_of(new_runs or [new])
  other_v = best(new, lambda name: name != impl)
  rows = []
  for r in new:
    if r["impl"] != impl:
      continue
    key = problem(r)
    row = dict(case=r["case"], mode=r["mode"], unit=metric(r)[0],
               base=mean(base_all.get(key, [None])),
               new=mean(new_all.get(key, [None])),
               best_other=other_v.get(key))
    if base_runs or new_runs:
      row["base_runs"] = base_all.get(key, [])
      row["new_runs"] = new_all.get(key, [])
    rows.append(row)
  return rows


def _ratio(a: Optional[float], b: Optional[float]) -> str:
  return f"{a / b:.3f}" if a is not None and b else "-"


def _value(v: Optional[float]) -> str:
  return "-" if v is None else f"{v:.0f}"


def _label(case: dict, mode: str) -> str:
  if case["kind"] == "decode":
    cache = (f"paged {case['page_size']}" if case.get("page_size")
             else "contiguous")
    return (f"decode B={case['batch']} Sq={case['q_len']} {cache} "
            f"Sk={case['kv_len']} D={case['head_dim']}")
  mask = "causal" if case.get("causal") else "full"
  return (f"{case['kind']} D={case['head_dim']} {mask} S={case['q_len']} "
          f"{mode}")


def markdown(rows: list[dict]) -> str:
  """The comparison as a Markdown table (with each run's values where a
  build ran more than once)."""
  runs = any("base_runs" in row for row in rows)
  header = ("| problem | unit | base | new | new / base | best other | "
            "new / best other |")
  if runs:
    header += " base runs | new runs |"
  lines = [header, "|" + "---|" * (header.count("|") - 1)]
  for row in rows:
    line = (f"| {_label(row['case'], row['mode'])} | {row['unit']} | "
            f"{_value(row['base'])} | {_value(row['new'])} | "
            f"{_ratio(row['new'], row['base'])} | {_value(row['best_other'])} | "
            f"{_ratio(row['new'], row['best_other'])} |")
    if runs:
      line += (" " + ", ".join(map(_value, row.get("base_runs", []))) + " | "
               + ", ".join(map(_value, row.get("new_runs", []))) + " |")
    lines.append(line)
  return "\n".join(lines)


def _run(library: pathlib.Path, impls: list[str], out: pathlib.Path,
         bench_args: list[str]) -> list[Record]:
  env = dict(os.environ, JAX_FLASH_CUDA_LIBRARY=str(library.resolve()))
  command = [sys.executable, "-m", "jax_flash.bench", *bench_args, "--impls",
             ",".join(impls), "--out", str(out), "--no-plots"]
  print("+ JAX_FLASH_CUDA_LIBRARY=%s %s" % (library, " ".join(command)),
        flush=True)
  subprocess.run(command, env=env, check=True)
  return json.loads((out / "results.json").read_text())["records"]


def run_order(count: int, abba: bool) -> list[int]:
  """The order in which builds 0 (the base) .. count - 1 run: each once, or
  with `abba` twice in a palindrome (0, 1, ..., count - 1, count - 1, ...,
  0), so that a drift between processes weighs on every build alike."""
  order = list(range(count))
  return order + order[::-1] if abba else order


def _run_dir(build: int, run: int, builds: int) -> str:
  """Output folder of a build's run: base, new, new_2, base_2 for two
  builds; new1, new1_2, new2, ... for several under test."""
  name = "base" if build == 0 else ("new" if builds == 2 else f"new{build}")
  return name if run == 1 else f"{name}_{run}"


def main(argv: Optional[list[str]] = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  bench_args: list[str] = []
  if "--" in argv:
    at = argv.index("--")
    argv, bench_args = argv[:at], argv[at + 1:]
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("base", type=pathlib.Path, help="baseline library")
  parser.add_argument("new", type=pathlib.Path, nargs="+",
                      help="libraries under test, each compared with base")
  parser.add_argument("--out", type=pathlib.Path, required=True)
  parser.add_argument("--impl", default=None,
                      help="jax_flash's implementation to compare (default: "
                      "jax_flash_kvcache_cuda with --kinds decode, else "
                      "jax_flash_cuda)")
  parser.add_argument("--abba", action="store_true",
                      help="run base, new, new, base and average each "
                      "build's two runs (cancels a drift between processes)")
  parser.add_argument("--others", default="",
                      help="comma-separated implementations run beside the "
                      "new build, e.g. jax_cudnn,fa3_jax")
  args = parser.parse_args(argv)
  for name in ("--impls", "--out", "--no-plots"):
    if name in bench_args:
      parser.error(f"{name} is set by this script, not after --")
  libraries = [args.base, *args.new]
  for library in libraries:
    if not library.is_file():
      parser.error(f"no library at {library}")
  impl = args.impl or ("jax_flash_kvcache_cuda"
                       if "decode" in " ".join(bench_args)
                       else "jax_flash_cuda")
  others = [name for name in args.others.split(",") if name]
  runs: list[list[list[Record]]] = [[] for _ in libraries]
  for build in run_order(len(libraries), args.abba):
    first_new = build == 1 and not runs[1]
    runs[build].append(_run(
        libraries[build], [impl] + (others if first_new else []),
        args.out / _run_dir(build, len(runs[build]) + 1, len(libraries)),
        bench_args))
  other_records = [r for r in runs[1][0] if r["impl"] != impl]
  tables = []
  for build in range(1, len(libraries)):
    new = runs[build][0] + (other_records if build > 1 else [])
    rows = (compare(runs[0][0], new, impl, base_runs=runs[0],
                    new_runs=runs[build]) if args.abba
            else compare(runs[0][0], new, impl))
    table = markdown(rows)
    if len(libraries) > 2:
      table = f"## {libraries[build].name} against {args.base.name}\n\n{table}"
    tables.append(table)
  table = "\n\n".join(tables)
  (args.out / "comparison.md").write_text(table + "\n")
  print(table)
  return 0


if __name__ == "__main__":
  sys.exit(main())
