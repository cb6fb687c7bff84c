"""Train the train_lm.py model with data and head (tensor) parallelism.

    python examples/sharded_training.py
    python examples/sharded_training.py --attention xla --model-parallel 4

All devices form a `jax.sharding.Mesh` with axes ("data", "model"): the batch
is split over "data", attention heads and the MLP's hidden units over "model"
(Megatron-style: the query/key/value and first MLP kernels are split by
output, the attention output and second MLP kernels by input). The step is a
plain `jax.jit`; XLA inserts the collectives the layout needs.

Attention is embarrassingly parallel over batch and heads, so it should add
no collective of its own. The script checks this twice on the compiled
programs: jax_flash's attention alone, forward and backward on inputs sharded
like the model's, compiles to no collective at all; and the training step
contains the same collectives with `--attention flash` as with Flax's
attention.

On a CPU the script asks XLA for 8 host devices (it must do so before JAX
starts, hence the environment variable set below).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
from typing import Optional

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS",
                                                                 ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jax_flash  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_lm  # noqa: E402

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
               "collective-permute")

# Where the "model" axis goes, by (layer, parameter) name.
PARAMETER_SPECS = {
    ("query", "kernel"): P(None, "model", None),  # (F, N, H)
    ("key", "kernel"): P(None, "model", None),
    ("value", "kernel"): P(None, "model", None),
    ("query", "bias"): P("model", None),  # (N, H)
    ("key", "bias"): P("model", None),
    ("value", "bias"): P("model", None),
    ("out", "kernel"): P("model", None, None),  # (N, H, F)
    ("mlp_in", "kernel"): P(None, "model"),  # (F, 4F)
    ("mlp_in", "bias"): P("model"),
    ("mlp_out", "kernel"): P("model", None),  # (4F, F)
}


def parameter_spec(path: tuple, _: jax.Array) -> P:
  """The PartitionSpec of one parameter; replicated unless listed above."""
  # The state's path is (..., layer, parameter) in dictionary keys, then the
  # variable's `.value` attribute.
  names = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
  return PARAMETER_SPECS.get(names[-2:], P())


def count_collectives(compiled: jax.stages.Compiled) -> collections.Counter:
  """How many of each collective op the optimized HLO contains."""
  hlo = compiled.as_text()
  counts = collections.Counter()
  for op in COLLECTIVES:
    # Asynchronous collectives appear as a -start/-done pair; count starts.
    # Combined ones have a tuple type, "(f32[..], f32[..])".
    counts[op] = len(re.findall(rf"= (\([^)]*\)|\S+) {op}(-start)?\(", hlo))
  return +counts


def attention_collectives(mesh: Mesh, args: argparse.Namespace
                          ) -> collections.Counter:
  """Collectives in jax_flash attention's forward and backward alone.

  The output cotangent is an input, so no loss reduction (which would need
  an all-reduce of its own) enters the program.
  """
  heads = args.num_heads
  kv_heads = args.num_kv_heads or heads
  head_dim = args.d_model // heads
  spec = NamedSharding(mesh, P("data", None, "model", None))
  shapes = [(args.batch_size, args.seq_len, h, head_dim)
            for h in (heads, kv_heads, kv_heads, heads)]
  q, k, v, dout = (jax.device_put(jnp.ones(s, jnp.dtype(args.dtype)), spec)
                   for s in shapes)

  def forward_and_backward(q, k, v, dout):
    attention = lambda q, k, v: jax_flash.flash_attention(q, k, v,
                                                          causal=True)
    out, vjp = jax.vjp(attention, q, k, v)
    return out, vjp(dout)

  compiled = jax.jit(forward_and_backward).lower(q, k, v, dout).compile()
  return count_collectives(compiled)


def make_mesh(model_parallel: Optional[int], num_heads: int) -> Mesh:
  """All devices as a ("data", "model") mesh.

  The "model" axis defaults to 2 devices when the device count and the head
  count allow it, else 1 (pure data parallelism).
  """
  devices = np.asarray(jax.devices())
  if model_parallel is None:
    model_parallel = 2 if devices.size % 2 == 0 and num_heads % 2 == 0 else 1
  if devices.size % model_parallel:
    raise ValueError(f"--model-parallel {model_parallel} does not divide "
                     f"{devices.size} devices")
  return Mesh(devices.reshape(-1, model_parallel), ("data", "model"))


def main(argv: Optional[list[str]] = None) -> dict:
  """Trains on the mesh; returns the numbers and collective counts."""
  parser = train_lm.make_parser()
  parser.add_argument("--model-parallel", type=int, default=None,
                      help="size of the mesh's 'model' axis (default 2)")
  parser.set_defaults(steps=40, log_every=10, sample=0)
  args = parser.parse_args(argv)
  mesh = make_mesh(args.model_parallel,
                   args.num_kv_heads or args.num_heads)
  print(f"mesh: {dict(mesh.shape)} over {jax.device_count()} "
        f"{jax.default_backend()} devices")

  corpus = train_lm.Corpus.load()
  model, _ = train_lm.build(args, corpus)
  graphdef, params = nnx.split(model)
  shardings = jax.tree_util.tree_map_with_path(
      lambda path, x: NamedSharding(mesh, parameter_spec(path, x)), params)
  params = jax.device_put(params, shardings)
  optimizer = train_lm.make_optimizer(args.learning_rate, args.steps)
  # The optimizer's moments take the parameters' shardings.
  opt_state = jax.jit(optimizer.init)(params)
  batch_sharding = NamedSharding(mesh, P("data", None))
  place = lambda x: jax.device_put(x, batch_sharding)
  train_lm.describe(args, params)

  example = [place(x) for x in corpus.batch(np.random.default_rng(0),
                                            args.batch_size, args.seq_len)]
  compiled = jax.jit(train_lm.make_train_step(graphdef, optimizer),
                     donate_argnums=(0, 1)).lower(params, opt_state,
                                                  *example).compile()
  step_collectives = count_collectives(compiled)
  alone = attention_collectives(mesh, args)
  print(f"collectives in one training step: {dict(step_collectives)}")
  print(f"collectives in jax_flash attention alone (forward and backward, "
        f"batch over 'data', heads over 'model'): {dict(alone) or 'none'}")

  params, result = train_lm.train(args, corpus, compiled, params, opt_state,
                                  place)
  kernel = params["blocks"][0]["attention"]["query"]["kernel"]
  print(f"first query kernel {kernel.shape} is sharded as "
        f"{kernel.sharding.spec}")
  result.update(step_collectives=dict(step_collectives),
                attention_collectives=dict(alone))
  print(f"final loss {result['final_loss']:.3f}; training throughput "
        f"{result['tokens_per_s']:,.0f} tokens/s")
  return result


if __name__ == "__main__":
  main()
