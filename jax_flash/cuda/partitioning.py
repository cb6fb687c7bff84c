"""Sharding rules: attention is independent per batch row and per KV head.

Inputs sharded over the batch or the heads (or both) run the custom call on
each device's shard with no communication. Sequence and head-dim shardings
are undone (gathered) first: every query needs every key. Heads are sharded
in whole GQA groups, so a device holding KV head j holds all its query heads.

Both partitioners are served: Shardy through the `sharding_rule`, GSPMD
through `infer_sharding_from_operands`; `partition` (used by both) settles
the final shardings from the query's. Operands with explicit sharding types
already say how they are sharded at trace time: `per_shard` runs those
under shard_map instead (custom_partitioning does not compile on explicit
meshes in every JAX version).
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Callable, Optional, Sequence, Union

import jax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from jax_flash.config import AttentionConfig

# Dimensions of every operand and result, one letter each: b batch, s query
# position, t key position, h query head, k KV head, d head dim of q/k, e head
# dim of v. A query head is the compound (k g): KV head k, index g in group.
_DIMS = {
    "q": "bshd", "k": "btkd", "v": "btke", "out": "bshe", "dout": "bshe",
    "lse": "bhs", "dlse": "bhs", "alibi_slopes": "bh", "q_segment_ids": "bs",
    "kv_segment_ids": "bt", "q_lengths": "b", "kv_lengths": "b",
    "position_offsets": "b",
    "dq": "bshd", "dk": "btkd", "dv": "btke", "dalibi": "bh",
    # The decoding call: a paged pool (n blocks of t positions) is shared by
    # every row, so it is sharded over the KV heads alone; m indexes a row's
    # block table.
    "k_pool": "ntkd", "v_pool": "ntke", "block_table": "bm",
}
_REPLICATED = ("s", "t", "d", "e", "g", "n", "m")

MeshAxes = Union[None, str, tuple[str, ...]]

logger = logging.getLogger("jax_flash")
_logged_gathers: set[str] = set()


def _log_gather_once(message: str) -> None:
  """Says once per message that an operand is gathered for the kernels: the
  program is right but holds whole arrays where the caller sharded them."""
  if message not in _logged_gathers:
    _logged_gathers.add(message)
    logger.warning("jax_flash: %s", message)


def forward_names(mask_names: tuple[str, ...]
                  ) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(operand names, result names) of the forward."""
  return ("q", "k", "v") + mask_names, ("out", "lse")


def backward_names(mask_names: tuple[str, ...]
                   ) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(operand names, result names) of the backward."""
  results = ("dq", "dk", "dv")
  if "alibi_slopes" in mask_names:
    results += ("dalibi",)
  return ("q", "k", "v", "out", "dout", "lse") + mask_names, results


def decode_names(optional_names: tuple[str, ...]
                 ) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(operand names, result names) of the decoding call (its optional
  operands: block_table, alibi_slopes)."""
  cache = (("k_pool", "v_pool") if "block_table" in optional_names
           else ("k", "v"))
  return ("q",) + cache + ("kv_lengths",) + optional_names, ("out", "lse")


Names = Callable[[tuple[str, ...]], tuple[tuple[str, ...], tuple[str, ...]]]


def _shardy_rule(names: Names, config: AttentionConfig,
                 mask_names: tuple[str, ...], group: int, mesh, operand_types,
                 result_types) -> tuple[str, dict]:
  """The Shardy rule, e.g. "b s (k g) d, b t k d, ... -> b s (k g) e, ..."."""
  del config, mesh, operand_types, result_types
  heads = "(k g)" if group > 1 else "k"
  spell = lambda name: " ".join(heads if c == "h" else c for c in _DIMS[name])
  operands, results = names(mask_names)
  rule = (", ".join(map(spell, operands)) + " -> " +
          ", ".join(map(spell, results)))
  # Shardy wants these in the order the factors first appear in the rule.
  appearance = dict.fromkeys(c for c in rule if c.isalpha())
  factors = dict(need_replication_factors=tuple(
      f for f in appearance if f in _REPLICATED))
  if group > 1:
    factors["g"] = group
  return rule, factors


def _mesh_size(mesh, axes: MeshAxes) -> int:
  if axes is None:
    return 1
  return math.prod(mesh.shape[a] for a in
                   ((axes,) if isinstance(axes, str) else axes))


def _local_axes(mesh, q_sharding, kv_heads: int, batch: int
                ) -> tuple[MeshAxes, MeshAxes]:
  """(batch axes, head axes) kept from the query's sharding.

  An axis is kept only when it divides the dimension evenly (heads: the KV
  heads, so that shards hold whole groups); anything else is gathered.
  """
  if not isinstance(q_sharding, NamedSharding):
    return None, None
  spec = tuple(q_sharding.spec) + (None,) * 4
  batch_axes = spec[0] if batch % _mesh_size(mesh, spec[0]) == 0 else None
  head_axes = spec[2] if kv_heads % _mesh_size(mesh, spec[2]) == 0 else None
  if spec[1] is not None:
    _log_gather_once(
        f"the query is sharded over its sequence (mesh axes {spec[1]!r}); "
        "the CUDA kernels gather it, since every query needs every key. "
        "jax_flash.ring_attention under shard_map, or explicitly sharded "
        "mesh axes, keep it sharded.")
  for name, axes, kept, size in (("batch", spec[0], batch_axes, batch),
                                 ("heads", spec[2], head_axes, kv_heads)):
    if axes is not None and kept is None:
      _log_gather_once(
          f"the query's {name} dimension ({size}) is sharded over mesh axes "
          f"{axes!r} of {_mesh_size(mesh, axes)} devices, which do not "
          "divide it (heads: the KV heads); it is gathered for the CUDA "
          "kernels.")
  return batch_axes, head_axes


def _specs(names: Sequence[str], batch_axes: MeshAxes,
           head_axes: MeshAxes) -> tuple[PartitionSpec, ...]:
  """Each named array sharded over batch and heads only."""
  axes = {"b": batch_axes, "h": head_axes, "k": head_axes}
  return tuple(PartitionSpec(*(axes.get(c) for c in _DIMS[n])) for n in names)


def _shardings(mesh, names: Sequence[str], batch_axes: MeshAxes,
               head_axes: MeshAxes) -> tuple[NamedSharding, ...]:
  return tuple(NamedSharding(mesh, spec)
               for spec in _specs(names, batch_axes, head_axes))


def _decide(names: Names, mask_names: tuple[str, ...], mesh,
            arg_shapes) -> tuple[tuple[NamedSharding, ...],
                                 tuple[NamedSharding, ...]]:
  """(operand shardings, result shardings) for these operands."""
  q, k = arg_shapes[0], arg_shapes[1]
  batch_axes, head_axes = _local_axes(mesh, q.sharding, k.shape[2],
                                      q.shape[0])
  operands, results = names(mask_names)
  return (_shardings(mesh, operands, batch_axes, head_axes),
          _shardings(mesh, results, batch_axes, head_axes))


def _infer(names: Names, config: AttentionConfig, mask_names: tuple[str, ...],
           group: int, mesh, arg_shapes, result_shape):
  del config, group, result_shape
  return _decide(names, mask_names, mesh, arg_shapes)[1]


def _partition(names: Names, local_fn: Callable, config: AttentionConfig,
               mask_names: tuple[str, ...], group: int, mesh, arg_shapes,
               result_shape):
  del group, result_shape
  arg_shardings, result_shardings = _decide(names, mask_names, mesh,
                                            arg_shapes)
  lower = functools.partial(local_fn, config=config, mask_names=mask_names)
  return mesh, lower, result_shardings, arg_shardings


def per_shard(fn: Callable, names: Names, mask_names: tuple[str, ...],
              operands: Sequence[jax.Array]) -> Optional[Sequence[jax.Array]]:
  """fn(*operands) under shard_map when they have explicit sharding types.

  Operands are resharded to batch and head sharding (the query's, as in
  `partition`) and fn runs on each shard. Returns None, running nothing,
  when the query's mesh has no explicit axis.
  """
  q, k = jax.typeof(operands[0]), jax.typeof(operands[1])
  mesh = q.sharding.mesh
  if AxisType.Explicit not in mesh.axis_types:
    return None
  batch_axes, head_axes = _local_axes(mesh, q.sharding, k.shape[2],
                                      q.shape[0])
  operand_names, result_names = names(mask_names)
  in_specs = _specs(operand_names, batch_axes, head_axes)
  # NamedShardings, not bare specs: no mesh context need be set.
  operands = [jax.sharding.reshard(x, NamedSharding(mesh, spec))
              for x, spec in zip(operands, in_specs)]
  return jax.shard_map(lambda *xs: tuple(fn(*xs)), mesh=mesh,
                       in_specs=in_specs,
                       out_specs=_specs(result_names, batch_axes, head_axes)
                       )(*operands)


def partitioned(local_fn: Callable, names: Names) -> Callable:
  """Wraps `local_fn(*arrays, config=, mask_names=)` with the sharding rules.

  Args:
    local_fn: computes one shard; gets shard shapes.
    names: `forward_names` or `backward_names`, naming local_fn's operands
      and results.

  Returns:
    f(config, mask_names, group, *arrays), group = query heads per KV head.
  """

  def call(config: AttentionConfig, mask_names: tuple[str, ...], group: int,
           *arrays: jax.Array):
    del group
    return local_fn(*arrays, config=config, mask_names=mask_names)

  wrapped = custom_partitioning(call, static_argnums=(0, 1, 2))
  wrapped.def_partition(
      partition=functools.partial(_partition, names, local_fn),
      infer_sharding_from_operands=functools.partial(_infer, names),
      sharding_rule=functools.partial(_shardy_rule, names))
  return wrapped
