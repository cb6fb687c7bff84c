"""Argument checks of `flash_attention_with_kv_cache`, run at trace time.

Every check raises `TypeError` (wrong kind or dtype) or `ValueError` (wrong
rank or shape) naming the argument and the shapes it got. Values (lengths,
block ids) are not checked here: out-of-range values are made harmless where
they are used (see `jax_flash.decode.append` and `jax_flash.decode.paged`).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from jax_flash import validation

PAGE_MULTIPLE = 16
"""A paged cache's block size must be a multiple of this."""


class CacheArguments(NamedTuple):
  """The checked cache arguments.

  Attributes:
    cache_seq_lengths: (B,) int32, as given (not yet clamped).
    block_table: (B, max_blocks) int32, or None for a contiguous cache.
    capacity: positions one batch row can hold: S_max, or max_blocks *
      block_size for a paged cache.
  """

  cache_seq_lengths: jax.Array
  block_table: Optional[jax.Array]
  capacity: int


def _describe(x: Any) -> str:
  return f"shape {tuple(x.shape)} and dtype {x.dtype}"


def _check_array(name: str, x: Any, rank: int, layout: str) -> None:
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise TypeError(f"{name} must be an array, got {type(x).__name__}")
  if x.ndim != rank:
    raise ValueError(f"{name} must have rank {rank} {layout}, got "
                     f"{_describe(x)}")


def check_cache_arguments(query: Any, key_cache: Any, value_cache: Any,
                          cache_seq_lengths: Any, block_table: Any,
                          new_key: Any, new_value: Any) -> CacheArguments:
  """Checks ranks, shapes and dtypes of every array argument.

  Args: those of `flash_attention_with_kv_cache`.

  Returns:
    The lengths and block table as int32 arrays, and the row capacity.
  """
  _check_array("query", query, 4, "(B, Sq, H, D)")
  if not any(query.dtype == d for d in validation.FLOAT_DTYPES):
    raise TypeError("query must be float32, bfloat16 or float16, got "
                    f"{_describe(query)}")
  paged = block_table is not None
  layout = ("(num_blocks, block_size, Hkv, D)" if paged else
            "(B, S_max, Hkv, D)")
  for name, cache in (("key_cache", key_cache), ("value_cache", value_cache)):
    _check_array(name, cache, 4, layout)
    if cache.dtype != query.dtype:
      raise TypeError(f"{name} must have the query's dtype {query.dtype}, got "
                      f"{_describe(cache)}")
  if key_cache.shape[:3] != value_cache.shape[:3]:
    raise ValueError(
        "key_cache and value_cache must agree on all but the last dim, got "
        f"key_cache {_describe(key_cache)} and value_cache "
        f"{_describe(value_cache)}")
  batch, sq, heads, head_dim = query.shape
  kv_heads = key_cache.shape[2]
  if key_cache.shape[3] != head_dim:
    raise ValueError(
        f"query and key_cache must have the same head dim, got query "
        f"{_describe(query)} and key_cache {_describe(key_cache)}")
  if kv_heads < 1 or heads % kv_heads:
    raise ValueError(
        f"the number of query heads ({heads}) must be a multiple of the "
        f"number of key/value heads of key_cache {_describe(key_cache)}")

  if paged:
    _check_array("block_table", block_table, 2, "(B, max_blocks)")
    if block_table.shape[0] != batch or block_table.shape[1] < 1:
      raise ValueError(
          f"block_table must have shape ({batch}, max_blocks) with "
          f"max_blocks >= 1 for query {_describe(query)}, got "
          f"{_describe(block_table)}")
    block_table = validation.check_mask_array(
        "block_table", block_table, tuple(block_table.shape), integer=True)
    block_size = key_cache.shape[1]
    if block_size % PAGE_MULTIPLE or block_size == 0:
      raise ValueError(
          f"a paged cache's block size must be a positive multiple of "
          f"{PAGE_MULTIPLE}, got key_cache {_describe(key_cache)}")
    capacity = block_table.shape[1] * block_size
  else:
    if key_cache.shape[0] != batch or key_cache.shape[1] < 1:
      raise ValueError(
          f"a contiguous key_cache must have shape ({batch}, S_max, "
          f"{kv_heads}, {head_dim}) with S_max >= 1 for query "
          f"{_describe(query)}, got key_cache {_describe(key_cache)} (pass "
          "block_table for a paged cache)")
    capacity = key_cache.shape[1]
  lengths = validation.check_mask_array("cache_seq_lengths",
                                        cache_seq_lengths, (batch,),
                                        integer=True)
  _check_new_tokens(query, key_cache, value_cache, new_key, new_value)
  if new_key is not None and sq > capacity:
    raise ValueError(
        f"{sq} new tokens (query {_describe(query)}) do not fit in a cache "
        f"of {capacity} positions per row (key_cache {_describe(key_cache)})")
  return CacheArguments(lengths, block_table, capacity)


def _check_new_tokens(query: Any, key_cache: Any, value_cache: Any,
                      new_key: Any, new_value: Any) -> None:
  if (new_key is None) != (new_value is None):
    raise ValueError("new_key and new_value must be given together")
  if new_key is None:
    return
  batch, sq = query.shape[:2]
  for name, new, cache in (("new_key", new_key, key_cache),
                           ("new_value", new_value, value_cache)):
    _check_array(name, new, 4, "(B, Sq, Hkv, D)")
    expected = (batch, sq) + tuple(cache.shape[2:])
    if tuple(new.shape) != expected:
      raise ValueError(
          f"{name} must have shape {expected} (B and Sq of query "
          f"{_describe(query)}, heads and head dim of the cache "
          f"{_describe(cache)}), got {_describe(new)}")
    if new.dtype != cache.dtype:
      raise TypeError(f"{name} must have the cache's dtype {cache.dtype}, got "
                      f"{_describe(new)}")


def cache_view_shape(query: jax.Array, value_cache: jax.Array,
                     capacity: int) -> tuple[jax.ShapeDtypeStruct,
                                             jax.ShapeDtypeStruct]:
  """Shapes of (key, value) as attention sees them: (B, capacity, Hkv, D|Dv)."""
  batch, _, _, head_dim = query.shape
  kv_heads, value_dim = value_cache.shape[2:]
  shape = lambda d: jax.ShapeDtypeStruct((batch, capacity, kv_heads, d),
                                         jnp.dtype(query.dtype))
  return shape(head_dim), shape(value_dim)
