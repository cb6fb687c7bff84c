"""The load-balanced sequence order of causal ring attention.

Under a causal mask the last positions attend to the most keys. Cut the
sequence in 2n chunks and give shard i chunks i and 2n - 1 - i: every shard
then holds one early and one late chunk and does the same work.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np


def _chunk_order(x: jax.Array, num_shards: int, axis: int,
                 inverse: bool, name: str) -> tuple[np.ndarray, int]:
  if (not isinstance(num_shards, numbers.Integral) or
      isinstance(num_shards, bool) or num_shards < 1):
    raise ValueError(f"{name}: num_shards must be a positive integer, got "
                     f"{num_shards!r}")
  if not -x.ndim <= axis < x.ndim:
    raise ValueError(f"{name}: axis {axis} is out of range for x of shape "
                     f"{tuple(x.shape)}")
  axis %= x.ndim
  if x.shape[axis] % (2 * num_shards):
    raise ValueError(
        f"{name}: x of shape {tuple(x.shape)}: the sequence length "
        f"{x.shape[axis]} (axis {axis}) must be divisible by 2 * num_shards "
        f"= {2 * num_shards}")
  early = np.arange(num_shards)
  order = np.stack([early, 2 * num_shards - 1 - early], axis=1).reshape(-1)
  return (np.argsort(order) if inverse else order), axis


def _reorder(x: jax.Array, order: np.ndarray, axis: int) -> jax.Array:
  chunks = len(order)
  shape = x.shape
  x = x.reshape(shape[:axis] + (chunks, shape[axis] // chunks) +
                shape[axis + 1:])
  return jnp.take(x, order, axis=axis).reshape(shape)


def load_balance(x: jax.Array, num_shards: int, axis: int = 1) -> jax.Array:
  """Reorders a sequence so that contiguous shards balance causal work.

  The sequence axis of length S is cut into 2 * num_shards chunks of
  S / (2 * num_shards) positions; the result holds chunks 0, 2n-1, 1, 2n-2,
  ..., so that splitting it into num_shards contiguous shards gives shard i
  the chunks i and 2n - 1 - i. Apply it to the query, key, value and segment
  ids (axis 1 of (B, S, ...)) before sharding them for
  `ring_attention(..., load_balanced=True)`; `unload_balance` is its inverse.

  Args:
    x: an array with the sequence on `axis`.
    num_shards: n, the size of the mesh axis the sequence is split over.
    axis: the sequence axis (1 for (B, S, H, D) and (B, S) arrays).

  Raises:
    ValueError: when S is not divisible by 2 * num_shards.
  """
  order, axis = _chunk_order(x, num_shards, axis, False, "load_balance")
  return _reorder(x, order, axis)


def unload_balance(x: jax.Array, num_shards: int, axis: int = 1) -> jax.Array:
  """The inverse of `load_balance`: back to the sequence's natural order."""
  order, axis = _chunk_order(x, num_shards, axis, True, "unload_balance")
  return _reorder(x, order, axis)
