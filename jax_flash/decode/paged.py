"""The pure-JAX view of a paged cache: gather each row's blocks in order.

A paged cache is a pool of blocks (num_blocks, block_size, Hkv, D) shared by
all rows; row b's position p lives in block `block_table[b, p // block_size]`
at offset `p % block_size`. The pure-JAX path gathers every row's table
entries into a contiguous (B, max_blocks * block_size, Hkv, D) copy and runs
the ordinary attention over it. That copy is a temporary of the size of the
equivalent contiguous cache, and the blockwise loop then reads only the key
blocks below the longest row's length. A loop over table entries would avoid
the copy but needs its own online softmax and key-position masking; the CUDA
kernel reads blocks through the table instead, and never reads past a row's
length.

A table entry outside [0, num_blocks) is an empty block: it is read from
block 0 (always in bounds) and its keys are masked through segment ids, so
no query ever sees them.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from jax_flash.config import AttentionConfig, MaskArrays

Attend = Callable[[jax.Array, jax.Array, jax.Array, AttentionConfig,
                   MaskArrays], tuple[jax.Array, jax.Array]]

CacheAttend = Callable[[jax.Array, jax.Array, jax.Array, Optional[jax.Array],
                        AttentionConfig, MaskArrays],
                       tuple[jax.Array, jax.Array]]
"""`(query, key_cache, value_cache, block_table, config, masks) -> (out,
lse)`: attention against a contiguous (block_table None) or paged cache, see
`jax_flash.decode.dispatch.select_cache_attention`."""


def gather_blocks(cache: jax.Array, block_table: jax.Array) -> jax.Array:
  """(num_blocks, block_size, Hkv, D) -> (B, max_blocks * block_size, Hkv, D).

  Entries outside [0, num_blocks) read block 0 (their keys must be masked).
  """
  num_blocks = cache.shape[0]
  ids = jnp.where((block_table >= 0) & (block_table < num_blocks),
                  block_table, 0)
  gathered = jnp.take(cache, ids, axis=0)
  return gathered.reshape((block_table.shape[0], -1) + cache.shape[2:])


def valid_block_ids(block_table: jax.Array, num_blocks: int,
                    block_size: int) -> jax.Array:
  """(B, max_blocks * block_size) int32: 0 in valid blocks, -1 elsewhere."""
  valid = (block_table >= 0) & (block_table < num_blocks)
  return jnp.repeat(valid.astype(jnp.int32) - 1, block_size, axis=1)


def over_cache(attend: Attend) -> CacheAttend:
  """`attend` run on the cache, gathered first when it is paged."""

  def cache_attend(query: jax.Array, key_cache: jax.Array,
                   value_cache: jax.Array, block_table: Optional[jax.Array],
                   config: AttentionConfig, masks: MaskArrays
                   ) -> tuple[jax.Array, jax.Array]:
    if block_table is None:
      return attend(query, key_cache, value_cache, config, masks)
    num_blocks, block_size = key_cache.shape[:2]
    batch, sq = query.shape[:2]
    # Invalid blocks get segment id -1; every query has id 0.
    masks = masks._replace(
        q_segment_ids=jnp.zeros((batch, sq), jnp.int32),
        kv_segment_ids=valid_block_ids(block_table, num_blocks, block_size))
    return attend(query, gather_blocks(key_cache, block_table),
                  gather_blocks(value_cache, block_table), config, masks)

  return cache_attend
