"""The two primitives, forward and backward, at the kernels' level.

Operands are already padded to a compiled head dim (D == Dv) and carry only
the mask arrays that are given (`mask_names` says which). Each primitive has
an abstract evaluation, a batching rule that folds vmapped axes into the
batch dimension (so any vmap is one kernel launch), and a lowering through
the sharding rules of `partitioning` to a local function, normally the FFI
call of `lowering`.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax._src import dispatch as _dispatch
from jax.interpreters import batching, mlir
from jax.sharding import PartitionSpec

from jax_flash.config import AttentionConfig
from jax_flash.cuda import lowering, partitioning

forward_p = Primitive("jax_flash_forward")
forward_p.multiple_results = True
backward_p = Primitive("jax_flash_backward")
backward_p.multiple_results = True


def forward(q: jax.Array, k: jax.Array, v: jax.Array,
            masks: Sequence[jax.Array], *, config: AttentionConfig,
            mask_names: tuple[str, ...]) -> tuple[jax.Array, jax.Array]:
  """(out (B, Sq, H, Dv), lse (B, H, Sq) f32)."""
  out, lse = _bind(forward_p, partitioning.forward_names, (q, k, v, *masks),
                   config, mask_names)
  return out, lse


def backward(q: jax.Array, k: jax.Array, v: jax.Array, out: jax.Array,
             dout: jax.Array, lse: jax.Array, masks: Sequence[jax.Array], *,
             config: AttentionConfig,
             mask_names: tuple[str, ...]) -> tuple[jax.Array, ...]:
  """(dq, dk, dv), plus dalibi (B, H) f32 when alibi slopes are given."""
  return tuple(_bind(backward_p, partitioning.backward_names,
                     (q, k, v, out, dout, lse, *masks), config, mask_names))


def _bind(primitive: Primitive, names: partitioning.Names,
          operands: Sequence[jax.Array], config: AttentionConfig,
          mask_names: tuple[str, ...]) -> Sequence[jax.Array]:
  bind = functools.partial(primitive.bind, config=config,
                           mask_names=mask_names)
  results = partitioning.per_shard(bind, names, mask_names, operands)
  return bind(*operands) if results is None else results


# Results are derived with `aval.update` from the operand they mirror, so
# they keep its sharding type (explicit sharding) and its manual-axis type
# (inside shard_map) whatever form this JAX version gives those.


def _forward_abstract(q, k, v, *masks, config, mask_names):
  del k, masks, config, mask_names
  batch, sq, heads, _ = q.shape
  spec = tuple(q.sharding.spec) + (None,) * (4 - len(q.sharding.spec))
  lse_sharding = q.sharding.update(spec=PartitionSpec(spec[0], spec[2],
                                                      spec[1]))
  return (q.update(shape=q.shape[:3] + v.shape[3:], weak_type=False),
          q.update(shape=(batch, heads, sq), dtype=jnp.float32,
                   weak_type=False, sharding=lse_sharding))


def _backward_abstract(q, k, v, out, dout, lse, *masks, config, mask_names):
  del out, dout, lse, config
  grads = [x.update(weak_type=False) for x in (q, k, v)]
  if "alibi_slopes" in mask_names:
    grads.append(masks[mask_names.index("alibi_slopes")].update(
        dtype=jnp.float32, weak_type=False))
  return grads


forward_p.def_abstract_eval(_forward_abstract)
backward_p.def_abstract_eval(_backward_abstract)


@functools.lru_cache(maxsize=None)
def _compiled(primitive: Primitive, config: AttentionConfig,
              mask_names: tuple[str, ...]) -> Callable:
  return jax.jit(functools.partial(primitive.bind, config=config,
                                   mask_names=mask_names))


def eager(primitive: Primitive):
  """Outside jit, a primitive runs as its own one-op jitted program."""
  return lambda *args, config, mask_names: _compiled(
      primitive, config, mask_names)(*args)


forward_p.def_impl(eager(forward_p))
backward_p.def_impl(eager(backward_p))


def _batching_rule(primitive: Primitive):
  """Folds the vmapped axis into the leading (batch) axis of every operand.

  Every operand and result of both primitives starts with the batch
  dimension, so a vmapped axis of size N is moved next to it and merged:
  (N, B, ...) -> (N * B, ...). Operands not mapped are broadcast first. The
  results are split back to (N, B, ...).
  """

  def rule(args, dims, **params):
    size = next(x.shape[d] for x, d in zip(args, dims) if d is not None)
    results = primitive.bind(*(fold_into_batch(x, d, size)
                               for x, d in zip(args, dims)), **params)
    return unfold_results(results, size)

  return rule


def fold_into_batch(x: jax.Array, dim: Optional[int], size: int) -> jax.Array:
  """x with its vmapped axis `dim` (None: unmapped, broadcast first) moved
  next to its leading batch axis and merged: (size, B, ...) -> (size * B,
  ...)."""
  x = (jnp.broadcast_to(x, (size,) + x.shape) if dim is None
       else jnp.moveaxis(x, dim, 0))
  return x.reshape((size * x.shape[1],) + x.shape[2:])


def unfold_results(results: Sequence[jax.Array], size: int):
  """A batching rule's answer for results of a folded call: (size * B, ...)
  split back to (size, B, ...), mapped along axis 0."""
  return ([r.reshape((size, -1) + r.shape[1:]) for r in results],
          [0] * len(results))


batching.primitive_batchers[forward_p] = _batching_rule(forward_p)
batching.primitive_batchers[backward_p] = _batching_rule(backward_p)


def register_lowerings(forward_local: Callable, backward_local: Callable,
                       platform: str) -> None:
  """Lowers both primitives on `platform` through the sharding rules.

  `forward_local` and `backward_local` compute one shard; they take the
  primitive's operands and keyword arguments config and mask_names. A
  program for one device calls them directly: its lowering then needs no
  device of `platform` (custom_partitioning does), so it can be inspected
  on any machine.
  """
  for primitive, local, names in (
      (forward_p, forward_local, partitioning.forward_names),
      (backward_p, backward_local, partitioning.backward_names)):
    sharded = partitioning.partitioned(local, names)

    def lower_sharded(*args, config, mask_names, sharded=sharded):
      group = args[0].shape[2] // args[1].shape[2]
      return sharded(config, mask_names, group, *args)

    def rule(ctx, *args, lower_local=mlir.lower_fun(local,
                                                    multiple_results=True),
             lower_sharded=mlir.lower_fun(lower_sharded,
                                          multiple_results=True),
             **params):
      one_device = getattr(ctx.module_context.axis_context, "num_devices",
                           None) == 1
      return (lower_local if one_device else lower_sharded)(ctx, *args,
                                                            **params)

    mlir.register_lowering(primitive, rule, platform=platform)


# custom_partitioning needs the devices of a sharded program while lowering;
# JAX only assigns them then for primitives in this set (its own cuDNN
# attention adds its primitives the same way). Without it (a JAX that dropped
# the set), single-device programs still lower.
_NEED_DEVICES = getattr(_dispatch, "prim_requires_devices_during_lowering",
                        set())
_NEED_DEVICES.update((forward_p, backward_p))


register_lowerings(lowering.forward_call, lowering.backward_call, "cuda")
