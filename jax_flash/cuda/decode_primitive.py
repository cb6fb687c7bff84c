"""The decoding kernel's call against a K/V cache as a JAX primitive.

`flash_attention_with_kv_cache` binds it (`decode_attention`); the forward of
`flash_attention` reaches the same kernel inside its own primitive's
lowering instead (`lowering.forward_call`, already on local shapes). Like
the forward and backward primitives it has:

* a batching rule that folds a vmapped axis into the batch, so any vmap is
  one launch. A paged pool that is itself vmapped (one pool per element) is
  folded too: the pools are stacked along their blocks and each element's
  block ids offset by its index times the pool size (ids outside the pool
  stay outside it, so they still read as empty blocks);
* a lowering through the sharding rules of `partitioning` (batch rows and
  K/V heads stay where they are; a paged pool, shared by every row, is
  sharded over the K/V heads only and replicated over the batch shards),
  and `partitioning.per_shard` for explicitly sharded operands.
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
from jax_flash.cuda import partitioning, primitives

decode_p = Primitive("jax_flash_decode_attention")
decode_p.multiple_results = True

OPTIONAL_NAMES = ("block_table", "alibi_slopes")
"""Optional operands after (q, k_cache, v_cache, kv_lengths), in order."""


def decode_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                     kv_lengths: jax.Array, *, config: AttentionConfig,
                     block_table: Optional[jax.Array] = None,
                     alibi_slopes: Optional[jax.Array] = None
                     ) -> tuple[jax.Array, jax.Array]:
  """(out (B, Sq, H, D), lse (B, H, Sq) f32) of the split-KV kernel.

  Arguments as `jax_flash.cuda.decode.decode_call`'s, on global shapes.
  """
  given = {"block_table": block_table, "alibi_slopes": alibi_slopes}
  names = tuple(n for n in OPTIONAL_NAMES if given[n] is not None)
  operands = (q, k_cache, v_cache, kv_lengths.astype(jnp.int32),
              *(given[n] for n in names))
  bind = functools.partial(decode_p.bind, config=config, mask_names=names)
  results = partitioning.per_shard(bind, partitioning.decode_names, names,
                                   operands)
  out, lse = bind(*operands) if results is None else results
  return out, lse


def _abstract(q, k_cache, v_cache, kv_lengths, *optional, config,
              mask_names):
  del k_cache, v_cache, kv_lengths, optional, config, mask_names
  batch, sq, heads, _ = q.shape
  spec = tuple(q.sharding.spec) + (None,) * (4 - len(q.sharding.spec))
  lse_sharding = q.sharding.update(spec=PartitionSpec(spec[0], spec[2],
                                                      spec[1]))
  return (q.update(weak_type=False),
          q.update(shape=(batch, heads, sq), dtype=jnp.float32,
                   weak_type=False, sharding=lse_sharding))


decode_p.def_abstract_eval(_abstract)


decode_p.def_impl(primitives.eager(decode_p))


def _batching_rule(args: Sequence[jax.Array], dims: Sequence[Optional[int]],
                   *, config: AttentionConfig, mask_names: tuple[str, ...]):
  size = next(x.shape[d] for x, d in zip(args, dims) if d is not None)
  fold = lambda i: primitives.fold_into_batch(args[i], dims[i], size)
  folded = [fold(i) for i in range(len(args))]
  if "block_table" in mask_names:
    k_dim, v_dim = dims[1], dims[2]
    if k_dim is None and v_dim is None:
      # One pool shared by every element: it is not folded.
      folded[1], folded[2] = args[1], args[2]
    else:
      # One pool per element: stacked along the blocks (as folded), and
      # each element's block ids offset into its own pool; ids outside a
      # pool stay outside every pool.
      num_blocks = args[1].shape[1 if k_dim == 0 else 0]
      at = 4 + mask_names.index("block_table")
      table = folded[at].reshape((size, -1) + folded[at].shape[1:])
      offset = (jnp.arange(size, dtype=jnp.int32) * num_blocks)[:, None, None]
      inside = (table >= 0) & (table < num_blocks)
      folded[at] = jnp.where(inside, table + offset, -1).reshape(
          folded[at].shape)
  results = decode_p.bind(*folded, config=config, mask_names=mask_names)
  return primitives.unfold_results(results, size)


batching.primitive_batchers[decode_p] = _batching_rule


def register_lowering(local: Callable, platform: str) -> None:
  """Lowers the primitive on `platform` through the sharding rules to
  `local(q, k_cache, v_cache, kv_lengths, *optional, config=, mask_names=)`,
  which computes one shard (normally the FFI call). A one-device program
  calls it directly, so that its lowering needs no device of `platform`."""
  sharded = partitioning.partitioned(local, partitioning.decode_names)

  def lower_sharded(*args, config, mask_names):
    group = args[0].shape[2] // args[1].shape[2]
    return sharded(config, mask_names, group, *args)

  def rule(ctx, *args, **params):
    one_device = getattr(ctx.module_context.axis_context, "num_devices",
                         None) == 1
    fn = local if one_device else lower_sharded
    return mlir.lower_fun(fn, multiple_results=True)(ctx, *args, **params)

  mlir.register_lowering(decode_p, rule, platform=platform)


def _local_decode(q, k_cache, v_cache, kv_lengths, *optional, config,
                  mask_names):
  # pylint: disable-next=import-outside-toplevel
  from jax_flash.cuda import decode
  given = dict(zip(mask_names, optional))
  return decode.decode_call(q, k_cache, v_cache, kv_lengths, config=config,
                            block_table=given.get("block_table"),
                            alibi_slopes=given.get("alibi_slopes"))


register_lowering(_local_decode, "cuda")
# As for the other primitives: JAX assigns devices while lowering only to
# primitives in this set, which custom_partitioning needs.
getattr(_dispatch, "prim_requires_devices_during_lowering",
        set()).add(decode_p)
