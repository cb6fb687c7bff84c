"""Command line: `python -m jax_flash.bench [--quick] [options]`.

Writes, under --out: results.json (every record and the environment,
rewritten after each case so an interrupted run keeps what it measured),
results.md (the tables) and the PNG charts. `--from-json` rebuilds the
tables and charts from earlier results files, merged. `--isolate` runs each
implementation in a process of its own (under --out/parts/) and merges them:
a kernel fault poisons the CUDA context of the process it happens in, and
must not take the other implementations' numbers with it.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shlex
import subprocess
import sys
import time
from typing import Any, Optional

from jax_flash.bench import cases as grid
from jax_flash.bench import environment, implementations, plots, report, runner


def _ints(text: str) -> tuple[int, ...]:
  return tuple(int(item) for item in text.split(","))


def _names(text: str) -> list[str]:
  return [item for item in text.split(",") if item]


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
  """The command-line options."""
  parser = argparse.ArgumentParser(
      prog="python -m jax_flash.bench", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true",
                      help="tiny sizes, few repetitions: a smoke test on CPU")
  parser.add_argument("--out", type=pathlib.Path,
                      default=pathlib.Path("bench_results"))
  parser.add_argument("--kinds", type=_names, default=["mha", "gqa", "decode"],
                      help="comma-separated subset of mha,gqa,decode")
  parser.add_argument("--head-dims", type=_ints,
                      help="restrict the cases to these D; a D outside "
                      "the grid (64, 128, 256) adds MHA cases at the grid's "
                      "S values, and one other than 128 adds decoding cases "
                      "(B = 4, one new token, the grid's Sk values)")
  parser.add_argument("--seqlens", type=_ints,
                      help="restrict MHA/GQA cases to these S")
  parser.add_argument("--masks", choices=["both", "full", "causal"],
                      default="both")
  parser.add_argument("--modes", type=_names, default=list(grid.MODES))
  parser.add_argument("--impls", type=_names,
                      help="comma-separated names: " + ",".join(
                          i.name for i in implementations.IMPLEMENTATIONS))
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--calls", type=int, default=30)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--max-round-seconds", type=float, default=0.5)
  parser.add_argument("--compile-threads", type=int, default=8)
  parser.add_argument(
      "--in-program-calls", type=int, default=1,
      help="JAX forward rows: calls per program run (a loop inside one "
           "compiled program), so that host dispatch stays out of short "
           "calls such as decoding; times are per call")
  parser.add_argument("--time-limit", type=float,
                      help="start no new case after this many seconds")
  parser.add_argument("--isolate", action="store_true",
                      help="one process per implementation, then merge")
  parser.add_argument("--no-plots", action="store_true")
  parser.add_argument("--from-json", type=pathlib.Path, nargs="+",
                      help="rebuild tables and charts from these results")
  return parser.parse_args(argv)


def select_cases(args: argparse.Namespace) -> list[grid.Case]:
  """The grid the options ask for."""
  chosen = grid.quick_grid() if args.quick else grid.default_grid()
  if args.head_dims and not args.quick:
    in_grid = {case.head_dim for case in chosen if case.kind == "mha"}
    extra = tuple(d for d in args.head_dims if d not in in_grid)
    chosen = chosen + grid.training_cases(extra, grid.SEQ_LENS)
    decode_dims = {case.head_dim for case in chosen if case.kind == "decode"}
    for d in args.head_dims:
      if d not in decode_dims:
        chosen = chosen + grid.decode_cases(grid.DECODE_LENS, head_dim=d)
  masks = {"both": (False, True), "full": (False,), "causal": (True,)}[args.masks]
  def keep(case: grid.Case) -> bool:
    if case.kind not in args.kinds:
      return False
    if args.head_dims is not None and case.head_dim not in args.head_dims:
      return False
    if case.kind == "decode":
      return True
    return (case.causal in masks
            and (args.seqlens is None or case.q_len in args.seqlens))
  return [case for case in chosen if keep(case)]


def write_outputs(records: list[dict[str, Any]], env: dict[str, Any],
                  out: pathlib.Path, with_plots: bool) -> None:
  """results.json, results.md and, when asked and possible, the charts."""
  out.mkdir(parents=True, exist_ok=True)
  (out / "results.json").write_text(
      json.dumps({"environment": env, "records": records}, indent=1))
  (out / "results.md").write_text(report.markdown(records, env))
  if with_plots:
    missing = plots.available()
    if missing:
      print(f"no charts: {missing}")
    else:
      for path in plots.write_plots(records, out, env["device"]):
        print(f"wrote {path}")


def load_results(paths: list[pathlib.Path]
                 ) -> tuple[list[dict[str, Any]], Optional[dict[str, Any]]]:
  """The records of several results.json files, merged, and an environment.

  A (case, implementation, mode) measured in more than one file keeps its
  first record, so list the file whose rows belong together first. The
  environment is the first file's, with every distinct command joined.
  """
  records, env, commands, seen = [], None, [], set()
  for path in paths:
    loaded = json.loads(path.read_text())
    for record in loaded["records"]:
      key = (json.dumps(record["case"], sort_keys=True), record["impl"],
             record["mode"])
      if key not in seen:
        seen.add(key)
        records.append(record)
    env = env or dict(loaded["environment"])
    if loaded["environment"]["command"] not in commands:
      commands.append(loaded["environment"]["command"])
  if env is not None:
    env["command"] = "`; `".join(commands)
  return records, env


def _child_argv(args: argparse.Namespace, impl: str, out: pathlib.Path,
                time_limit: Optional[float]) -> list[str]:
  """Options of the process that measures one implementation."""
  argv = ["--impls", impl, "--out", str(out), "--no-plots",
          "--kinds", ",".join(args.kinds), "--masks", args.masks,
          "--modes", ",".join(args.modes), "--rounds", str(args.rounds),
          "--calls", str(args.calls), "--warmup", str(args.warmup),
          "--max-round-seconds", str(args.max_round_seconds),
          "--compile-threads", str(args.compile_threads),
          "--in-program-calls", str(args.in_program_calls)]
  if args.quick:
    argv.append("--quick")
  if args.head_dims:
    argv += ["--head-dims", ",".join(map(str, args.head_dims))]
  if args.seqlens:
    argv += ["--seqlens", ",".join(map(str, args.seqlens))]
  if time_limit is not None:
    argv += ["--time-limit", f"{time_limit:.0f}"]
  return argv


def _run_isolated(args: argparse.Namespace, command: str) -> None:
  """Each implementation in its own process, one after the other; a
  process that dies keeps the cases it finished (results.json is rewritten
  after each), and the merged report notes the ones that produced nothing."""
  impls = implementations.by_name(args.impls)
  repo = str(pathlib.Path(__file__).resolve().parents[2])
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
      [repo] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
  start = time.monotonic()
  paths = []
  for index, impl in enumerate(impls):
    time_limit = None
    if args.time_limit:
      left = args.time_limit - (time.monotonic() - start)
      time_limit = max(left, 0) / (len(impls) - index)
    part = args.out / "parts" / impl.name
    done = subprocess.run(
        [sys.executable, "-m", "jax_flash.bench"]
        + _child_argv(args, impl.name, part, time_limit), env=env, check=False)
    if (part / "results.json").exists():
      paths.append(part / "results.json")
    if done.returncode:
      print(f"{impl.name}: its process exited with status {done.returncode}")
  records, _ = load_results(paths)
  environment_now = environment.describe(command)
  write_outputs(records, environment_now, args.out, not args.no_plots)
  print_report(records, environment_now, args)


def print_report(records: list[dict[str, Any]], env: dict[str, Any],
                 args: argparse.Namespace) -> None:
  """The tables, or with --quick a short summary (results.md has the
  tables)."""
  if args.quick:
    print(report.summary(records))
    print(f"tables: {args.out / 'results.md'}")
  else:
    print(report.markdown(records, env))


def main(argv: Optional[list[str]] = None) -> None:
  """Runs the benchmark the options describe."""
  args = parse_args(argv)
  if args.from_json:
    records, env = load_results(args.from_json)
    write_outputs(records, env, args.out, not args.no_plots)
    return
  command = shlex.join(["python", "-m", "jax_flash.bench"]
                       + (sys.argv[1:] if argv is None else argv))
  if args.isolate:
    _run_isolated(args, command)
    return
  if args.quick:
    args.rounds, args.calls, args.warmup = 2, 3, 1
  settings = runner.Settings(
      rounds=args.rounds, calls=args.calls, warmup=args.warmup,
      max_round_seconds=args.max_round_seconds, modes=tuple(args.modes),
      compile_threads=args.compile_threads,
      in_program_calls=args.in_program_calls,
      # --quick (on a CPU most implementations cannot run) gives the
      # reasons once, in the summary, not once per case and mode.
      log_skipped=not args.quick)
  impls = implementations.by_name(args.impls)
  env = environment.describe(command)
  start = time.monotonic()
  records = []
  for index, case in enumerate(select_cases(args)):
    if args.time_limit and time.monotonic() - start > args.time_limit:
      print(f"time limit reached: stopping before {case.label()}")
      break
    records += runner.run_case(case, impls, settings, seed=index)
    write_outputs(records, env, args.out, with_plots=False)
  write_outputs(records, env, args.out, not args.no_plots)
  print_report(records, env, args)


if __name__ == "__main__":
  main()
