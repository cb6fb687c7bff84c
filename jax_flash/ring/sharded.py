"""`flash_attention` on a sequence split by explicit shardings runs the ring.

Under `jax.jit`, operands whose type says (an explicit mesh axis, as
`jax.make_mesh` makes by default) that the sequence dimension of the query
and the key is split over mesh axes are attended by `ring_attention` over
those axes, in contiguous order, under `jax.shard_map`: nothing is gathered.
Batch and head shardings are kept when they divide the batch and the KV heads
(whole GQA groups); head-dim shardings are undone.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from jax_flash.attention import NormalizedCall
from jax_flash.ring.attention import ring_attention
from jax_flash.ring.plan import AxisName as MeshAxes


def _explicit_spec(x: jax.Array):
  """(mesh, spec padded to x.ndim) of an explicitly sharded x, else None."""
  sharding = getattr(jax.typeof(x), "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  if mesh is None or AxisType.Explicit not in getattr(mesh, "axis_types", ()):
    return None
  return mesh, tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))


def _size(mesh, axes: Optional[MeshAxes]) -> int:
  if axes is None:
    return 1
  return math.prod(mesh.shape[a] for a in
                   ((axes,) if isinstance(axes, str) else axes))


def sequence_axes(call: NormalizedCall) -> Optional[MeshAxes]:
  """The mesh axes the sequence of query and key is split over, when the
  ring can serve the call (equal lengths, no lengths or dropout), else None."""
  masks = call.masks
  if (call.query.shape[1] != call.key.shape[1] or
      masks.q_lengths is not None or masks.kv_lengths is not None or
      masks.dropout_seed is not None):
    return None
  specs = [_explicit_spec(x) for x in (call.query, call.key, call.value)]
  if any(s is None for s in specs):
    return None
  axes = {s[1][1] for s in specs}
  if len(axes) != 1:
    return None
  axis = axes.pop()
  return axis if axis is not None else None


def attend(call: NormalizedCall, axes: MeshAxes,
           implementation: Optional[str]) -> tuple[jax.Array, jax.Array]:
  """(out, lse) of the call by the ring over `axes`."""
  q, k, v, config, masks = call[:5]
  mesh, q_spec = _explicit_spec(q)
  batch = q_spec[0] if q.shape[0] % _size(mesh, q_spec[0]) == 0 else None
  heads = q_spec[2] if k.shape[2] % _size(mesh, q_spec[2]) == 0 else None
  rows, vectors, per_head = (PartitionSpec(batch, axes, heads),
                             PartitionSpec(batch, axes),
                             PartitionSpec(batch, heads))
  operands = {"q": (q, rows), "k": (k, rows), "v": (v, rows)}
  if masks.q_segment_ids is not None:
    operands["ids"] = ((masks.q_segment_ids, masks.kv_segment_ids),
                       (vectors, vectors))
  if masks.alibi_slopes is not None:
    operands["slopes"] = (masks.alibi_slopes, per_head)
  names = list(operands)
  specs = tuple(operands[n][1] for n in names)
  values = [jax.tree_util.tree_map(
      lambda x, s: jax.sharding.reshard(x, NamedSharding(mesh, s)),
      operands[n][0], operands[n][1]) for n in names]

  def local(*values):
    given = dict(zip(names, values))
    return ring_attention(
        given["q"], given["k"], given["v"], axis_name=axes,
        causal=config.causal,
        window_size=(config.window_left, config.window_right),
        softcap=config.softcap or None, softmax_scale=config.softmax_scale,
        segment_ids=given.get("ids"), alibi_slopes=given.get("slopes"),
        deterministic=config.deterministic, return_lse=True,
        implementation=implementation)

  return jax.shard_map(local, mesh=mesh, in_specs=specs,
                       out_specs=(rows, PartitionSpec(batch, heads, axes))
                       )(*values)
