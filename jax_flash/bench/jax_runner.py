"""Compiling, feeding and timing JAX attention programs.

Programs are compiled ahead of time (`jit(...).lower(...).compile()`), which
lets the runner compile all implementations of a case on several threads
while the device is idle, and gives each program's memory footprint.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jax_flash.bench import timing
from jax_flash.bench.cases import Case
from jax_flash.bench.implementations import Attend


@dataclasses.dataclass(frozen=True)
class InputSet:
  """Random inputs of one call: q, k, v and the output cotangent."""

  q: jax.Array
  k: jax.Array
  v: jax.Array
  dout: jax.Array

  def row0(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """q, k, v of batch row 0 on the host, for the correctness check."""
    return tuple(np.asarray(x[0]) for x in (self.q, self.k, self.v))


@dataclasses.dataclass(frozen=True)
class CompiledMode:
  """The executables one mode of one implementation needs.

  Attributes:
    program: the timed executable.
    residuals: for "bwd", the executable computing the saved residuals
      (a vjp function) from q, k, v; None otherwise.
    peak_bytes: arguments + outputs + temporaries of the program, when XLA
      reports them.
    repeat: calls of the attention per program run ("fwd" only; see
      `compile_mode`).
    n_sets: input sets the program takes when repeat > 1 (it rotates
      through them itself).
  """

  program: Any
  residuals: Optional[Any]
  peak_bytes: Optional[int]
  repeat: int = 1
  n_sets: int = 1


def _shapes(case: Case) -> tuple[jax.ShapeDtypeStruct, ...]:
  dtype = jnp.dtype(case.dtype)
  b, sq, sk, h, hkv, d = (case.batch, case.q_len, case.kv_len, case.heads,
                          case.kv_heads, case.head_dim)
  return (jax.ShapeDtypeStruct((b, sq, h, d), dtype),
          jax.ShapeDtypeStruct((b, sk, hkv, d), dtype),
          jax.ShapeDtypeStruct((b, sk, hkv, d), dtype),
          jax.ShapeDtypeStruct((b, sq, h, d), dtype))


def input_bytes(case: Case) -> int:
  """Bytes of one `InputSet` of the case."""
  return sum(int(np.prod(s.shape)) * s.dtype.itemsize for s in _shapes(case))


def make_inputs(case: Case, n_sets: int, seed: int, *,
                query_scale: float = 1.0) -> list[InputSet]:
  """Fresh standard-normal inputs (never zeros), `n_sets` independent sets.

  Args:
    case: shapes and dtype.
    n_sets: number of sets to rotate through.
    seed: PRNG seed; each set uses its own key.
    query_scale: multiplies q (to fold a softmax scale into the inputs).

  Returns:
    The input sets, on the default device.
  """
  shapes = _shapes(case)

  @jax.jit
  def draw(key):
    keys = jax.random.split(key, len(shapes))
    arrays = [jax.random.normal(k, s.shape, jnp.float32)
              for k, s in zip(keys, shapes)]
    arrays[0] = arrays[0] * query_scale
    return [a.astype(s.dtype) for a, s in zip(arrays, shapes)]

  base = jax.random.key(seed)
  return [InputSet(*draw(jax.random.fold_in(base, i))) for i in range(n_sets)]


def compile_mode(attend: Attend, case: Case, mode: str, *, repeat: int = 1,
                 n_sets: int = 1) -> CompiledMode:
  """Compiles the timed program of `mode` ("fwd", "bwd" or "fwd_bwd").

  With repeat > 1 (forward only) one program run makes `repeat` calls in a
  `lax.fori_loop`, on `n_sets` input sets in turn, so that one host dispatch
  serves them all: for calls of tens of microseconds (decoding), whose
  back-to-back launches otherwise measure the host as much as the device.
  An optimization barrier ties each call's inputs to the loop's carry, so
  XLA neither hoists a call out of the loop nor merges calls; the output
  carried through the loop is the last call's, on set 0.
  """
  q, k, v, dout = _shapes(case)
  if repeat > 1:
    if mode != "fwd":
      raise ValueError(f"repeat={repeat} times the forward only, not {mode!r}")
    return CompiledMode(_looped(attend, repeat, n_sets).lower(
        *(q, k, v) * n_sets).compile(), None, None, repeat, n_sets)
  if mode == "fwd":
    return CompiledMode(jax.jit(attend).lower(q, k, v).compile(), None, None)
  if mode == "fwd_bwd":
    def forward_backward(q, k, v, dout):
      return jax.vjp(attend, q, k, v)[1](dout)
    program = jax.jit(forward_backward).lower(q, k, v, dout).compile()
    return CompiledMode(program, None, _footprint(program))
  if mode == "bwd":
    residuals = jax.jit(lambda q, k, v: jax.vjp(attend, q, k, v)[1])
    vjp_shape = jax.eval_shape(residuals, q, k, v)
    program = jax.jit(lambda vjp, dout: vjp(dout)).lower(vjp_shape, dout).compile()
    return CompiledMode(program, residuals.lower(q, k, v).compile(), None)
  raise ValueError(f"unknown mode {mode!r}")


def _looped(attend: Attend, repeat: int, n_sets: int) -> Any:
  """jit of f(q0, k0, v0, q1, ...): `repeat` calls of attend, the last on
  set 0 (call i takes set (repeat - 1 - i) % n_sets)."""

  def looped(*flat):
    def call(j):
      return lambda xs: attend(*xs[3 * j:3 * j + 3])

    def body(i, carry):
      token, _ = carry
      token, xs = jax.lax.optimization_barrier((token, flat))
      out = jax.lax.switch((repeat - 1 - i) % n_sets,
                           [call(j) for j in range(n_sets)], xs)
      return token + out.reshape(-1)[0].astype(jnp.float32), out

    shape = jax.eval_shape(attend, *flat[:3])
    init = (jnp.float32(0), jnp.zeros(shape.shape, shape.dtype))
    return jax.lax.fori_loop(0, repeat, body, init)[1]

  return jax.jit(looped)


def _footprint(program: Any) -> Optional[int]:
  try:
    stats = program.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if stats is None:
    return None
  return int(stats.argument_size_in_bytes + stats.output_size_in_bytes
             + stats.temp_size_in_bytes - stats.alias_size_in_bytes)


def call_args(compiled: CompiledMode, inputs: InputSet,
              mode: str) -> tuple[Any, ...]:
  """The arguments of `compiled.program` for one input set: q, k, v (and
  the cotangent for "fwd_bwd"); for "bwd" the saved residuals and the
  cotangent (the residuals computed here, outside the timed program)."""
  if mode == "fwd":
    return (inputs.q, inputs.k, inputs.v)
  if mode == "fwd_bwd":
    return (inputs.q, inputs.k, inputs.v, inputs.dout)
  return (compiled.residuals(inputs.q, inputs.k, inputs.v), inputs.dout)


def measure(compiled: CompiledMode, inputs: list[InputSet], mode: str,
            **timing_options: Any) -> tuple[timing.Timing, Optional[jax.Array]]:
  """Times a compiled mode over rotating inputs.

  Returns:
    The timing and, for "fwd", the output of input set 0 (for the check).
  """
  program = compiled.program
  if compiled.repeat > 1:
    # One argument list holding every set: the program rotates them.
    flat = [x for s in inputs[:compiled.n_sets] for x in (s.q, s.k, s.v)]
    if len(flat) != 3 * compiled.n_sets:
      raise ValueError(f"the program takes {compiled.n_sets} input sets, "
                       f"got {len(inputs)}")
    args = [tuple(flat)]
  else:
    args = [call_args(compiled, s, mode) for s in inputs]
  result = timing.time_calls(lambda i: program(*args[i % len(args)]),
                             jax.block_until_ready, **timing_options)
  if compiled.repeat > 1:
    result = timing.per_inner_call(result, compiled.repeat)
  out = program(*args[0]) if mode == "fwd" else None
  return result, out
