"""The one timing helper every benchmark measurement goes through.

Method (the same for JAX and PyTorch rows): a few warm-up calls, then rounds
of calls launched back to back with a single synchronisation at the end of
each round; the time of a call is the round's wall time over its number of
calls, and the result is the median over rounds. Launching back to back keeps
per-call host synchronisation out of the number (it costs 10-25% at small
sizes). Call `i` of a round uses input set `i % n_sets`, so when the caller
rotates several input sets whose total exceeds the L2 cache, no call finds
its inputs already cached by the previous one.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable

L2_ROTATION_BYTES = 128 * 2**20
"""Total input bytes to rotate through: over twice the L2 of an H100 (50 MB)
or an H200 (60 MB)."""

MAX_INPUT_SETS = 8
"""Upper bound on rotated input sets, to bound the memory they take."""


@dataclasses.dataclass(frozen=True)
class Timing:
  """Result of `time_calls`.

  Attributes:
    seconds: median over rounds of the time per call.
    round_seconds: the time per call of every round, in order.
    calls_per_round: calls launched back to back in each round.
  """

  seconds: float
  round_seconds: tuple[float, ...]
  calls_per_round: int

  @property
  def spread(self) -> float:
    """(max - min) / median over rounds: how far to trust a difference."""
    return (max(self.round_seconds) - min(self.round_seconds)) / self.seconds


def input_sets_needed(bytes_per_set: int) -> int:
  """How many input sets to rotate so that together they overflow the L2."""
  needed = -(-L2_ROTATION_BYTES // max(bytes_per_set, 1))
  return int(max(1, min(MAX_INPUT_SETS, needed)))


def time_calls(launch: Callable[[int], Any], wait: Callable[[Any], None], *,
               rounds: int = 5, calls: int = 30, warmup: int = 2,
               max_round_seconds: float = 0.5) -> Timing:
  """Times `launch` by the module's method.

  Args:
    launch: `launch(i)` enqueues call number i (choosing its input set from
      i) and returns something `wait` can block on.
    wait: blocks until the device work behind a `launch` result, and all
      work enqueued before it, has finished.
    rounds: rounds to take the median over.
    calls: calls per round, at most.
    warmup: untimed calls first (compilation, autotuning, allocator warm-up).
    max_round_seconds: fewer calls per round when one call is slow, so that
      a round takes about this long at most (at least one call a round).

  Returns:
    A `Timing`.
  """
  result = None
  for i in range(max(warmup, 1)):
    result = launch(i)
  wait(result)
  start = time.perf_counter()
  wait(launch(0))
  single = time.perf_counter() - start
  calls = max(1, min(calls, int(max_round_seconds / max(single, 1e-9))))
  per_call = []
  for _ in range(rounds):
    start = time.perf_counter()
    for i in range(calls):
      result = launch(i)
    wait(result)
    per_call.append((time.perf_counter() - start) / calls)
  return Timing(statistics.median(per_call), tuple(per_call), calls)


def per_inner_call(result: Timing, calls_per_run: int) -> Timing:
  """`result` of runs that each make `calls_per_run` calls, per call."""
  return Timing(result.seconds / calls_per_run,
                tuple(t / calls_per_run for t in result.round_seconds),
                result.calls_per_round * calls_per_run)
