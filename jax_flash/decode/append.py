"""Writing new tokens into a contiguous or paged K/V cache, in place.

New token i of batch row b goes to position `lengths[b] + i` of that row.
Writes are scatters with `mode="drop"`: a position at or past the row's
capacity, or one whose table entry is not a block id in [0, num_blocks),
is dropped rather than written anywhere else. Under `jit` with the caches
donated the scatter updates the donated buffer: the cache is not copied.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp


def token_positions(lengths: jax.Array, num_new: int) -> jax.Array:
  """(B, Sq) int32 positions of the new tokens in their rows."""
  return lengths[:, None] + jnp.arange(num_new, dtype=jnp.int32)[None, :]


def lengths_after(lengths: jax.Array, num_new: int,
                  capacity: int) -> jax.Array:
  """(B,) int32 valid positions after appending `num_new` tokens to rows of
  `lengths` (already in [0, capacity]): tokens that do not fit are dropped."""
  return jnp.minimum(lengths + num_new, capacity)


def append_tokens(key_cache: jax.Array, value_cache: jax.Array,
                  new_key: jax.Array, new_value: jax.Array,
                  lengths: jax.Array, block_table: Optional[jax.Array]
                  ) -> tuple[jax.Array, jax.Array]:
  """The caches with the new tokens written at each row's length.

  Args:
    key_cache: (B, S_max, Hkv, D), or (num_blocks, block_size, Hkv, D) with
      a block table.
    value_cache: the same with Dv.
    new_key: (B, Sq, Hkv, D) in the cache's dtype.
    new_value: (B, Sq, Hkv, Dv).
    lengths: (B,) int32 positions already filled, in [0, capacity].
    block_table: (B, max_blocks) int32 block ids, or None.

  Returns:
    (key_cache, value_cache) updated; tokens that do not fit are dropped.
  """
  positions = token_positions(lengths, new_key.shape[1])
  if block_table is None:
    # One scatter per row, batched by vmap: the batch dimension stays a
    # batch dimension of the scatter, so a cache sharded over rows is
    # updated where it lives. A position past the capacity is an index past
    # the end, which mode="drop" ignores.
    capacity = key_cache.shape[1]
    write = jax.vmap(lambda cache, new, pos: cache.at[pos].set(new,
                                                                mode="drop"))
    positions = jnp.minimum(positions, capacity)
    return (write(key_cache, new_key, positions),
            write(value_cache, new_value, positions))
  num_blocks, block_size = key_cache.shape[:2]
  max_blocks = block_table.shape[1]
  slot = positions // block_size
  block = jnp.take_along_axis(block_table, jnp.minimum(slot, max_blocks - 1),
                              axis=1)
  writable = (slot < max_blocks) & (block >= 0) & (block < num_blocks)
  index = (jnp.where(writable, block, num_blocks), positions % block_size)
  return (key_cache.at[index].set(new_key, mode="drop"),
          value_cache.at[index].set(new_value, mode="drop"))
