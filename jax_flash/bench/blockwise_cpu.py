"""The blockwise path against dense XLA attention on the host CPU.

    python -m jax_flash.bench.blockwise_cpu [--seqlens 1024,4096,16384]

B=1, H=8, D=64, float32, non-causal: forward and forward+backward time and the
compiled program's temporary memory of `flash_attention(implementation="xla")`
and `jax.nn.dot_product_attention(implementation="xla")`. The dense program is
only compiled, not run, when its temporaries would not fit in host memory.
"""

from __future__ import annotations

import argparse
import os
from typing import Callable, Optional

import jax
import jax.numpy as jnp

import jax_flash
from jax_flash.bench import timing

BATCH, HEADS, HEAD_DIM = 1, 8, 64


def _blockwise(q, k, v):
  return jax_flash.flash_attention(q, k, v, implementation="xla")


def _dense(q, k, v):
  return jax.nn.dot_product_attention(q, k, v, implementation="xla")


def _programs(attend: Callable, s: int):
  shape = jax.ShapeDtypeStruct((BATCH, s, HEADS, HEAD_DIM), jnp.float32)
  fwd = jax.jit(attend).lower(shape, shape, shape).compile()
  fwd_bwd = jax.jit(lambda q, k, v, g: jax.vjp(attend, q, k, v)[1](g)).lower(
      shape, shape, shape, shape).compile()
  return fwd, fwd_bwd


def _temp_gib(program) -> float:
  return program.memory_analysis().temp_size_in_bytes / 2**30


def _host_memory_gib() -> float:
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def _time(program, args, rounds: int) -> float:
  return timing.time_calls(lambda i: program(*args), jax.block_until_ready,
                           rounds=rounds, calls=1, warmup=1).seconds


def measure(s: int, rounds: int) -> list[dict]:
  """Rows (one per implementation) for sequence length s."""
  keys = jax.random.split(jax.random.key(s), 4)
  args = [jax.random.normal(key, (BATCH, s, HEADS, HEAD_DIM), jnp.float32)
          for key in keys]
  rows = []
  for name, attend in (("jax_flash blockwise", _blockwise),
                       ("jax.nn xla (dense)", _dense)):
    fwd, fwd_bwd = _programs(attend, s)
    row = dict(impl=name, s=s, fwd_temp=_temp_gib(fwd),
               fwd_bwd_temp=_temp_gib(fwd_bwd), fwd_s=None, fwd_bwd_s=None)
    if row["fwd_bwd_temp"] < 0.6 * _host_memory_gib():
      row["fwd_s"] = _time(fwd, args[:3], rounds)
      row["fwd_bwd_s"] = _time(fwd_bwd, args, rounds)
    rows.append(row)
    print(f"  S={s:6d} {name:22s} done", flush=True)
  return rows


def markdown(rows: list[dict]) -> str:
  """The results as a markdown table, with dense/blockwise ratios."""
  fmt = lambda x, unit: "not run (memory)" if x is None else f"{x:.3g} {unit}"
  lines = ["| S | implementation | fwd time | fwd+bwd time | fwd temp | "
           "fwd+bwd temp |", "|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['s']} | {r['impl']} | {fmt(r['fwd_s'], 's')} | "
                 f"{fmt(r['fwd_bwd_s'], 's')} | {r['fwd_temp']:.3g} GiB | "
                 f"{r['fwd_bwd_temp']:.3g} GiB |")
  return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m jax_flash.bench.blockwise_cpu",
                                   description=__doc__)
  parser.add_argument("--seqlens", default="1024,4096,16384")
  parser.add_argument("--rounds", type=int, default=3)
  args = parser.parse_args(argv)
  rows = []
  for s in (int(x) for x in args.seqlens.split(",")):
    rows += measure(s, args.rounds)
  print(f"\n{jax.devices()[0].device_kind}, B={BATCH} H={HEADS} D={HEAD_DIM} "
        "float32, non-causal, median of rounds\n")
  print(markdown(rows))


if __name__ == "__main__":
  main()
