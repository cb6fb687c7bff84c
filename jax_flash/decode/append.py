"""Writing new tokens into a contiguous or paged K/V cache, in place.

New token i of batch row b goes to position `start[b] + i` of that row,
where `start` is the row's length, or capacity - Sq when the new tokens
would not fit otherwise: they then overwrite the row's last positions, as
Flax's cache does. Writes are scatters with `mode="drop"`: a position whose
table entry is not a block id in [0, num_blocks) is dropped rather than
written anywhere else. Under `jit` with the caches
donated the scatter updates the donated buffer: the cache is not copied.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp


def append_start(lengths: jax.Array, num_new: int,
                 capacity: int) -> jax.Array:
  """(B,) int32 position of the first new token of rows holding `lengths`
  (in [0, capacity]) positions: the length, or capacity - num_new when the
  tokens would not fit after it (num_new <= capacity)."""
  return jnp.minimum(lengths, capacity - num_new)


def append_tokens(key_cache: jax.Array, value_cache: jax.Array,
                  new_key: jax.Array, new_value: jax.Array,
                  start: jax.Array, block_table: Optional[jax.Array]
                  ) -> tuple[jax.Array, jax.Array]:
  """The caches with the new tokens written at each row's length.

  Args:
    key_cache: (B, S_max, Hkv, D), or (num_blocks, block_size, Hkv, D) with
      a block table.
    value_cache: the same with Dv.
    new_key: (B, Sq, Hkv, D) in the cache's dtype.
    new_value: (B, Sq, Hkv, Dv).
    start: (B,) int32 position of each row's first new token, from
      `append_start`.
    block_table: (B, max_blocks) int32 block ids, or None.

  Returns:
    (key_cache, value_cache) updated.
  """
  positions = start[:, None] + jnp.arange(new_key.shape[1],
                                          dtype=jnp.int32)[None, :]
  if block_table is None:
    # One scatter per row, batched by vmap: the batch dimension stays a
    # batch dimension of the scatter, so a cache sharded over rows is
    # updated where it lives.
    write = jax.vmap(lambda cache, new, pos: cache.at[pos].set(new,
                                                                mode="drop"))
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
