"""Ring attention: the public function, its custom VJP and the two rings.

Forward: n steps. At each, the key/value block in hand is first sent on to
the next shard (so that the transfer overlaps the step's compute), then the
local queries attend to it; the (out, lse) of every step are merged in
float32. Backward: the ring runs again with the global (out, lse); float32
dK/dV accumulators travel with their K/V block and are home after n steps.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp

from jax_flash import layout, validation
from jax_flash.attention import Implementation, SegmentIds, normalize_arguments
from jax_flash.config import MaskArrays
from jax_flash.first_order import first_order_only
from jax_flash.merge import merge_attention_states
from jax_flash.ring import steps
from jax_flash.ring.plan import AxisName, RingPlan, Term


def ring_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    axis_name: AxisName,
    causal: bool = False,
    window_size: Optional[tuple[int, int]] = None,
    softcap: Optional[float] = None,
    softmax_scale: Optional[float] = None,
    segment_ids: Optional[SegmentIds] = None,
    load_balanced: bool = False,
    return_lse: bool = False,
    implementation: Implementation = None,
    alibi_slopes: Optional[jax.Array] = None,
    deterministic: bool = False,
) -> Union[jax.Array, tuple[jax.Array, jax.Array]]:
  """`flash_attention` over a sequence split across a mesh axis.

  Call it inside `jax.shard_map` (or any context where `axis_name` is a
  bound mesh axis of size n). Letters: B batch, S the global sequence length,
  S / n the local one, H query heads, Hkv key/value heads, D and Dv head dims.

  Args:
    query: (B, S / n, H, D) (or (S / n, H, D)): this shard's part of the
      queries.
    key: (B, S / n, Hkv, D): the keys of the same positions.
    value: (B, S / n, Hkv, Dv).
    axis_name: the mesh axis (or tuple of axes) the sequence dimension is
      split over. Shard i
      holds the i-th contiguous part of the sequence, or with
      `load_balanced` the chunks i and 2n - 1 - i of 2n.
    causal, window_size, softcap, softmax_scale, alibi_slopes: as in
      `flash_attention`, on global positions (queries and keys have the same
      global length, so causal is the plain lower triangle).
    segment_ids: this shard's ids, (B, S / n) or a pair (q_ids, kv_ids);
      the key ids travel around the ring with the keys.
    load_balanced: the inputs were reordered by `load_balance`; the output
      (and lse) come in the same order (`unload_balance` restores it).
    return_lse: also return lse (B, H, S / n) float32.
    implementation: as in `flash_attention`, chosen for each attention call
      of a step (window and alibi steps pass global position offsets, which
      the CUDA kernels and the blockwise path both take).
    deterministic: as in `flash_attention`; the ring adds its steps in a
      fixed order.

  Returns:
    out (B, S / n, H, Dv), the rows of attention over the whole sequence
    that this shard's queries produce; with return_lse, (out, lse).
    Differentiable in query, key, value and the alibi slopes. K, V and their
    gradients move between neighbours with `ppermute`; nothing is gathered.

  Raises:
    TypeError, ValueError: bad arguments, as `flash_attention`, or query
    and key of different lengths, or (load balanced) an odd local length.
  """
  validation.check_implementation(implementation)
  call = normalize_arguments(
      query, key, value, softmax_scale=softmax_scale, causal=causal,
      window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
      segment_ids=segment_ids, deterministic=deterministic)
  q, k, v, config, masks = call[:5]
  num_shards = jax.lax.axis_size(axis_name)
  if q.shape[1] != k.shape[1]:
    raise ValueError(
        "ring_attention needs query and key of the same length, got query "
        f"of shape {tuple(query.shape)} and key of shape {tuple(key.shape)}")
  if load_balanced and q.shape[1] % 2:
    raise ValueError(
        f"ring_attention(load_balanced=True): query of shape "
        f"{tuple(query.shape)} on each of {num_shards} shards: the global "
        f"length {num_shards * q.shape[1]} must be divisible by 2 * "
        f"{num_shards} (load_balance cuts it in 2 * num_shards chunks)")
  if masks.alibi_slopes is not None:
    # Slopes vary over the ring like the queries they scale; the gradient of
    # a copy shared by all shards is then summed over the axis by autodiff.
    masks = masks._replace(alibi_slopes=masks.alibi_slopes +
                           layout.zeros_varying_like((), q))
  plan = RingPlan(axis_name=axis_name, num_shards=num_shards,
                  local_len=q.shape[1], load_balanced=bool(load_balanced),
                  config=config, has_alibi=masks.alibi_slopes is not None,
                  implementation=implementation)
  out, lse = _ring(plan, q, k, v, masks)
  if not call.batched:
    out, lse = out[0], lse[0]
  return (out, lse) if return_lse else out


def _shard(plan: RingPlan):
  """This shard's index on the ring (a Python 0 on a ring of one)."""
  return 0 if plan.num_shards == 1 else jax.lax.axis_index(plan.axis_name)


def _send(plan: RingPlan, tree):
  """Every array of `tree` to the next shard of the ring (none on one)."""
  if plan.num_shards == 1:
    return tree
  perm = [(j, (j + 1) % plan.num_shards) for j in range(plan.num_shards)]
  return jax.tree_util.tree_map(
      lambda x: jax.lax.ppermute(x, plan.axis_name, perm), tree)


def _around_the_ring(plan: RingPlan, step: Callable, carry):
  """carry = step(source, carry) for the n steps of the ring.

  At step t the block in hand comes from shard source = (i - t) mod n. Each
  step sends its block on, the last one too (the block is then back home):
  one loop body, compiled once, serves every step.
  """
  shard, n = _shard(plan), plan.num_shards
  if n == 1:
    return step(shard, carry)
  return jax.lax.fori_loop(0, n, lambda t, c: step((shard - t) % n, c),
                           carry)


def _when(active, compute: Callable, skip: Callable):
  """compute() where `active`, else skip(); None when it is never active.

  Where `active` is known at trace time (a ring of one) there is no branch.
  """
  if not isinstance(active, jax.core.Tracer):
    return compute() if bool(active) else None
  return jax.lax.cond(active, compute, skip)


class _TermInputs:
  """The slices of the local queries and the block in hand one term uses."""

  def __init__(self, plan: RingPlan, term: Term, q: jax.Array, block,
               masks: MaskArrays, shard, source):
    k, v, kv_ids = block
    self.rows, self.cols = plan.rows(term.q_piece), plan.rows(term.k_piece)
    self.q, self.k, self.v = q[:, self.rows], k[:, self.cols], v[:, self.cols]
    self.masks = plan.term_masks(term, masks, kv_ids, shard, source)
    self.active = plan.active(term, shard, source)

  def zeros(self, shape: tuple[int, ...]) -> jax.Array:
    return layout.zeros_varying_like(shape, self.q, self.k, self.v,
                                     self.masks)


def _forward(plan: RingPlan, q: jax.Array, k: jax.Array, v: jax.Array,
             masks: MaskArrays) -> tuple[jax.Array, jax.Array]:
  batch, length, heads, _ = q.shape
  zeros = lambda shape: layout.zeros_varying_like(shape, q, k, v, masks)
  empty = lambda: (zeros((batch, length, heads, v.shape[3])),
                   zeros((batch, heads, length)) - jnp.inf)
  shard = _shard(plan)

  def step(source, carry):
    block, out, lse = carry
    ahead = _send(plan, block)
    for term in plan.terms():
      t = _TermInputs(plan, term, q, block, masks, shard, source)

      def attend(t=t, term=term):
        part, part_lse = steps.forward(plan.implementation, t.q, t.k, t.v,
                                       term.config, t.masks)
        return part.astype(jnp.float32), part_lse

      def skip(t=t, rows=t.q.shape[1]):
        return (t.zeros((batch, rows, heads, v.shape[3])),
                t.zeros((batch, heads, rows)) - jnp.inf)

      part = _when(t.active, attend, skip)
      if part is None:
        continue
      if out is None and t.rows == slice(None):
        out, lse = part  # the first part on a ring of one: nothing to merge
        continue
      if out is None:
        out, lse = empty()
      part, part_lse = part
      merged, merged_lse = merge_attention_states(
          [out[:, t.rows], part], [lse[..., t.rows], part_lse])
      out = out.at[:, t.rows].set(merged)
      lse = lse.at[..., t.rows].set(merged_lse)
    return ahead, out, lse

  # A ring of one has a single step, without a loop carry to initialize.
  init = (None, None) if plan.num_shards == 1 else empty()
  _, out, lse = _around_the_ring(plan, step,
                                 ((k, v, masks.kv_segment_ids),) + init)
  if out is None:
    out, lse = empty()
  return out.astype(q.dtype), lse


def _backward(plan: RingPlan, q, k, v, masks, out, lse, dout, dlse):
  zeros = lambda x: layout.zeros_varying_like(x.shape, q, k, v, masks)
  shard = _shard(plan)

  def step(source, carry):
    block, (dk, dv), dq, dalibi = carry
    ahead = _send(plan, block)
    for term in plan.terms():
      t = _TermInputs(plan, term, q, block, masks, shard, source)

      def gradients(t=t, term=term):
        grads = steps.backward(
            plan.implementation, t.q, t.k, t.v, out[:, t.rows],
            lse[..., t.rows], dout[:, t.rows], dlse[..., t.rows],
            term.config, t.masks)
        return tuple(None if g is None else g.astype(jnp.float32)
                     for g in grads)

      def skip(t=t):
        return (t.zeros(t.q.shape), t.zeros(t.k.shape), t.zeros(t.v.shape),
                None if dalibi is None else t.zeros(dalibi.shape))

      grads = _when(t.active, gradients, skip)
      if grads is None:
        continue
      dq_t, dk_t, dv_t, dalibi_t = grads
      dq = dq.at[:, t.rows].add(dq_t)
      dk = dk.at[:, t.cols].add(dk_t)
      dv = dv.at[:, t.cols].add(dv_t)
      if dalibi is not None:
        dalibi = dalibi + dalibi_t
    return ahead, _send(plan, (dk, dv)), dq, dalibi

  slopes = masks.alibi_slopes
  init = ((k, v, masks.kv_segment_ids), (zeros(k), zeros(v)), zeros(q),
          None if slopes is None else zeros(slopes))
  _, (dk, dv), dq, dalibi = _around_the_ring(plan, step, init)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dalibi


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(plan: RingPlan, q: jax.Array, k: jax.Array, v: jax.Array,
          masks: MaskArrays) -> tuple[jax.Array, jax.Array]:
  return _forward(plan, q, k, v, masks)


def _ring_fwd(plan, q, k, v, masks):
  out, lse = _forward(plan, q, k, v, masks)
  return (out, lse), (q, k, v, masks, out, lse)


def _ring_bwd(plan, residuals, cotangents):
  q, k, v, masks, out, lse = residuals
  dout, dlse = cotangents
  dq, dk, dv, dalibi = first_order_only(functools.partial(_backward, plan))(
      q, k, v, masks, out, lse, dout, dlse)
  mask_grads = jax.tree_util.tree_map(lambda _: None, masks)
  return dq, dk, dv, mask_grads._replace(alibi_slopes=dalibi)


_ring.defvjp(_ring_fwd, _ring_bwd)
