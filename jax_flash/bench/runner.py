"""Runs every implementation on one case and turns timings into records.

A record is a plain dict (it goes to JSON as is): the case, the
implementation, the mode, and either the measurement (seconds, TFLOP/s,
GB/s of K/V for decoding, spread over rounds, peak memory, check error) or
the reason it was skipped.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jax_flash.bench import checks, flops, jax_runner, timing, torch_runner
from jax_flash.bench.cases import MODES, Case
from jax_flash.bench.implementations import Implementation

ERROR_CHARS = 200
"""Longest error message kept in a skip note."""


@dataclasses.dataclass(frozen=True)
class Settings:
  """How to measure.

  Attributes:
    rounds: rounds per measurement (the median is reported).
    calls: calls launched back to back per round, at most.
    warmup: untimed calls before the first round.
    max_round_seconds: fewer calls per round for slow programs.
    modes: which of "fwd", "bwd", "fwd_bwd" to measure.
    compile_threads: JAX programs of one case compiled concurrently.
    seed: base PRNG seed of the inputs.
    log_skipped: log a line for each record that was not measured too.
    in_program_calls: calls per program run of the JAX forward programs
      (`jax_runner.compile_mode`'s repeat): above 1, host dispatch stays
      out of short calls such as decoding.
  """

  rounds: int = 5
  calls: int = 30
  warmup: int = 2
  max_round_seconds: float = 0.5
  modes: tuple[str, ...] = MODES
  compile_threads: int = 8
  seed: int = 0
  log_skipped: bool = True
  in_program_calls: int = 1

  def timing_options(self) -> dict[str, Any]:
    """Keyword arguments of `timing.time_calls`."""
    return dict(rounds=self.rounds, calls=self.calls, warmup=self.warmup,
                max_round_seconds=self.max_round_seconds)


def describe_error(error: BaseException) -> str:
  """One short line naming an exception, for a skip note."""
  lines = str(error).strip().splitlines()
  text = f"{type(error).__name__}: {lines[0] if lines else ''}"
  return text if len(text) <= ERROR_CHARS else text[:ERROR_CHARS - 3] + "..."


def _skip_reason(impl: Implementation, case: Case, mode: str,
                 on_gpu: bool, torch_missing: Optional[str]) -> Optional[str]:
  if impl.framework == "torch" and torch_missing:
    return torch_missing
  if impl.needs_gpu and not on_gpu:
    return "needs a GPU"
  if case.page_size and not impl.paged:
    return "no paged K/V cache"
  return impl.skip_reason(case, mode)


def _record(case: Case, impl: Implementation, mode: str, *,
            note: Optional[str] = None, result: Optional[timing.Timing] = None,
            n_sets: int = 0, peak_bytes: Optional[int] = None,
            error: Optional[float] = None,
            in_program_calls: int = 1) -> dict[str, Any]:
  record: dict[str, Any] = {
      "case": dataclasses.asdict(case), "impl": impl.name, "label": impl.label,
      "ours": impl.ours, "mode": mode,
      "flops": flops.attention_flops(
          case.batch, case.heads, case.q_len, case.kv_len, case.head_dim,
          causal=case.causal, mode=mode),
  }
  if result is None:
    record.update(status="skipped", note=note)
    return record
  record.update(
      status="ok", seconds=result.seconds, spread=result.spread,
      calls_per_round=result.calls_per_round, rounds=len(result.round_seconds),
      input_sets=n_sets, tflops=record["flops"] / result.seconds / 1e12,
      peak_bytes=peak_bytes, check_error=error,
      in_program_calls=in_program_calls)
  if case.kind == "decode":
    moved = flops.kv_read_bytes(case.batch, case.kv_len, case.kv_heads,
                                case.head_dim,
                                itemsize=jnp.dtype(case.dtype).itemsize)
    record["gbps"] = moved / result.seconds / 1e9
  if error is not None and not error <= checks.MAX_RELATIVE_ERROR:
    record["note"] = f"check failed: relative error {error:.2e}"
  return record


_compiled_once: set[str] = set()
"""Implementations this process has compiled a program of."""


def _compile(impl: Implementation, case: Case, mode: str,
             in_program_calls: int = 1) -> jax_runner.CompiledMode:
  if mode == "fwd" and in_program_calls > 1:
    return jax_runner.compile_mode(
        impl.build(case), case, mode, repeat=in_program_calls,
        n_sets=timing.input_sets_needed(jax_runner.input_bytes(case)))
  return jax_runner.compile_mode(impl.build(case), case, mode)


def _compile_now(impl: Implementation, case: Case, mode: str,
                 in_program_calls: int = 1) -> concurrent.futures.Future:
  """Compiles on the calling thread; the result or error in a done future."""
  future: concurrent.futures.Future = concurrent.futures.Future()
  try:
    future.set_result(_compile(impl, case, mode, in_program_calls))
  except Exception as error:  # pylint: disable=broad-except
    future.set_exception(error)
  return future


def run_case(case: Case, impls: list[Implementation], settings: Settings,
             seed: int, log: Callable[[str], None] = print
             ) -> list[dict[str, Any]]:
  """Measures every implementation and mode of one case.

  JAX programs of the case are compiled concurrently first; measurements
  then run one at a time. Any failure becomes a skipped record with a note.

  Args:
    case: the problem.
    impls: implementations to try.
    settings: measurement settings.
    seed: PRNG seed of this case's inputs.
    log: receives one line per record (per measured record unless
      settings.log_skipped).

  Returns:
    One record per (implementation, mode).
  """
  on_gpu = jax.default_backend() == "gpu"
  torch_missing = (torch_runner.available()
                   if any(i.framework == "torch" for i in impls) else None)
  plan = []
  for impl in impls:
    variant = case.with_dtype(impl.dtype) if impl.dtype else case
    for mode in (m for m in case.modes if m in settings.modes):
      reason = _skip_reason(impl, variant, mode, on_gpu, torch_missing)
      plan.append((impl, variant, mode, reason))

  with concurrent.futures.ThreadPoolExecutor(settings.compile_threads) as pool:
    compiled = {}
    for impl, variant, mode, reason in plan:
      if reason is not None or impl.framework != "jax":
        continue
      repeat = settings.in_program_calls
      if impl.name in _compiled_once:
        compiled[(impl.name, mode)] = pool.submit(_compile, impl, variant,
                                                  mode, repeat)
      else:
        # An implementation's first compilation may load a library and
        # register custom calls, which need not be thread-safe: do it here.
        _compiled_once.add(impl.name)
        compiled[(impl.name, mode)] = _compile_now(impl, variant, mode,
                                                   repeat)
    # Compilation autotunes on the device: let it finish before any timing.
    concurrent.futures.wait(compiled.values())
    inputs: dict[tuple[str, float], list[jax_runner.InputSet]] = {}
    records = []
    for impl, variant, mode, reason in plan:
      record = _measure_one(impl, variant, mode, reason, compiled, inputs,
                            settings, seed)
      records.append(record)
      if record["status"] == "ok" or settings.log_skipped:
        log(_log_line(record, variant))
  return records


def _measure_one(impl: Implementation, case: Case, mode: str,
                 reason: Optional[str],
                 compiled: dict[tuple[str, str], concurrent.futures.Future],
                 inputs: dict[tuple[str, float], list[jax_runner.InputSet]],
                 settings: Settings, seed: int) -> dict[str, Any]:
  """Measures one (implementation, mode) or explains why not."""
  if reason is not None:
    return _record(case, impl, mode, note=reason)
  n_sets = timing.input_sets_needed(jax_runner.input_bytes(case))
  # A kernel without a scale argument gets it folded into its queries, so
  # the check compares against unscaled attention of those queries.
  check_scale = case.softmax_scale if impl.applies_scale else 1.0
  repeat = 1
  try:
    if impl.framework == "torch":
      result, rows, peak = torch_runner.measure(
          impl, case, mode, n_sets, seed, **settings.timing_options())
    else:
      program = compiled[(impl.name, mode)].result()
      key = (case.dtype, case.softmax_scale / check_scale)
      if key not in inputs:
        inputs[key] = jax_runner.make_inputs(case, n_sets, seed,
                                             query_scale=key[1])
      result, out = jax_runner.measure(program, inputs[key], mode,
                                       **settings.timing_options())
      peak = program.peak_bytes
      repeat = program.repeat
      rows = None if out is None else (np.asarray(out[0]),) + inputs[key][0].row0()
  except Exception as error:  # pylint: disable=broad-except
    return _record(case, impl, mode, note=describe_error(error))
  error = None
  if rows is not None:
    error = checks.relative_error(*rows, softmax_scale=check_scale,
                                  causal=case.causal)
  return _record(case, impl, mode, result=result, n_sets=n_sets,
                 peak_bytes=peak, error=error, in_program_calls=repeat)


def _log_line(record: dict[str, Any], case: Case) -> str:
  head = f"{case.label():60s} {record['mode']:7s} {record['impl']:15s}"
  if record["status"] != "ok":
    return f"{head} skipped: {record['note']}"
  line = f"{head} {record['tflops']:8.2f} TFLOP/s ±{100 * record['spread']:.0f}%"
  if "gbps" in record:
    line += f" {record['gbps']:7.0f} GB/s"
  if record.get("check_error") is not None:
    line += f" err {record['check_error']:.1e}"
  if record.get("note"):
    line += f" ({record['note']})"
  return line
