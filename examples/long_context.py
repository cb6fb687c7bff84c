"""Train the train_lm.py model with its sequence split over all devices.

    python examples/long_context.py
    python examples/long_context.py --seq-len 8192 --batch-size 2

Context parallelism: the training step runs under `jax.shard_map` over a
one-axis mesh ("seq") of all n devices, each holding S / n positions of
every sequence and so of every activation. Everything in the model but
attention is per position; attention is `jax_flash.ring_attention`, which
passes key/value blocks between neighbours (collective-permutes) instead of
gathering the sequence. The sequence is put in `jax_flash.load_balance`
order first, so that every device does the same share of causal work; the
positions travel with the tokens, and the loss does not care about order.
The loss is the mean over all devices, and its gradient with respect to the
replicated parameters is summed over them (an all-reduce).

The model is train_lm.py's, with Flax's attention layer given the ring as
its `attention_fn`. The script prints the loss, the throughput, the memory
XLA plans per device for one step and the collectives in that step. On a
CPU it asks XLA for 8 host devices (before JAX starts, hence the environment
variable below).
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any, Optional

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS",
                                                                 ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jax_flash  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_lm  # noqa: E402
from sharded_training import count_collectives  # noqa: E402

AXIS = "seq"
TOKENS = P(None, AXIS)


def ring_attention_fn(query: jax.Array, key: jax.Array, value: jax.Array, *,
                      mask: Optional[jax.Array] = None,
                      is_causal: bool = False, dropout_rate: float = 0.0,
                      **_: Any) -> jax.Array:
  """An `nnx.MultiHeadAttention` attention_fn: the ring over the "seq" axis."""
  if mask is not None or dropout_rate > 0:
    raise ValueError("the ring takes causal masks only, without dropout")
  return jax_flash.ring_attention(query, key, value, axis_name=AXIS,
                                  causal=is_causal, load_balanced=True)


def make_train_step(graphdef: nnx.GraphDef,
                    optimizer: optax.GradientTransformation, mesh: Mesh):
  """(params, opt_state, inputs, targets, positions) -> (params, opt_state,
  loss), with inputs, targets and positions split over the "seq" axis."""

  def loss_fn(params, inputs, targets, positions):
    logits = nnx.merge(graphdef, params)(inputs, positions)
    local = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jax.lax.pmean(local.mean(), AXIS)

  def train_step(params, opt_state, inputs, targets, positions):
    loss, grads = jax.value_and_grad(loss_fn)(params, inputs, targets,
                                              positions)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.shard_map(train_step, mesh=mesh,
                       in_specs=(P(), P(), TOKENS, TOKENS, P(AXIS)),
                       out_specs=(P(), P(), P()))


def per_device_memory(compiled: jax.stages.Compiled) -> str:
  """What XLA plans for one device: its arguments and temporaries."""
  analysis = compiled.memory_analysis()
  if analysis is None:
    return "not reported by this backend"
  mib = lambda n: f"{n / 2**20:.1f} MiB"
  return (f"arguments {mib(analysis.argument_size_in_bytes)}, temporaries "
          f"{mib(analysis.temp_size_in_bytes)}")


def main(argv: Optional[list[str]] = None) -> dict:
  """Trains with the sequence sharded; returns the numbers and collectives."""
  parser = train_lm.make_parser()
  parser.set_defaults(steps=30, log_every=10, sample=0, batch_size=4,
                      seq_len=256, d_model=64, num_layers=2)
  args = parser.parse_args(argv)
  args.attention = "ring"
  n = jax.device_count()
  mesh = Mesh(np.asarray(jax.devices()), (AXIS,))
  print(f"mesh: {dict(mesh.shape)} over {n} {jax.default_backend()} "
        f"devices; {args.seq_len // n} positions per device")

  corpus = train_lm.Corpus.load()
  model, _ = train_lm.build(args, corpus)
  for block in model.blocks:
    block.attention.attention_fn = ring_attention_fn
  graphdef, params = nnx.split(model)
  optimizer = train_lm.make_optimizer(args.learning_rate, args.steps)
  opt_state = optimizer.init(params)
  train_lm.describe(args, params)

  balance = functools.partial(jax_flash.load_balance, num_shards=n)
  sharding = NamedSharding(mesh, TOKENS)
  place = lambda x: jax.device_put(balance(jnp.asarray(x)), sharding)
  positions = jax.device_put(balance(jnp.arange(args.seq_len), axis=0),
                             NamedSharding(mesh, P(AXIS)))
  example = [place(x) for x in corpus.batch(np.random.default_rng(0),
                                            args.batch_size, args.seq_len)]
  compiled = jax.jit(make_train_step(graphdef, optimizer, mesh),
                     donate_argnums=(0, 1)).lower(
                         params, opt_state, *example, positions).compile()
  collectives = count_collectives(compiled)
  print(f"collectives in one training step: {dict(collectives)}")
  print(f"memory per device for one step: {per_device_memory(compiled)}")

  step = lambda *a: compiled(*a, positions)
  params, result = train_lm.train(args, corpus, step, params, opt_state,
                                  place)
  result["step_collectives"] = dict(collectives)
  print(f"final loss {result['final_loss']:.3f}; training throughput "
        f"{result['tokens_per_s']:,.0f} tokens/s; peak memory "
        f"{train_lm.peak_memory()}")
  return result


if __name__ == "__main__":
  main()
