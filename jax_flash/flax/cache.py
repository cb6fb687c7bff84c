"""The autoregressive key/value cache shared by the Linen and NNX layers.

The layout is Flax's: cached keys and values (batch..., max_length, Hkv, D)
and a scalar int32 index of the next free position, so a cache built by
Flax's own layers is read unchanged. One call may append several positions
(prefill); attention then sees keys [0, index + n) through `kv_seq_lengths`,
and `causal` aligns the n new queries with the last n keys.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def append_to_cache(cached_key: jax.Array, cached_value: jax.Array,
                    index: jax.Array, key: jax.Array, value: jax.Array
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Writes n new positions at `index`.

  Args:
    cached_key: (batch..., max_length, Hkv, D).
    cached_value: (batch..., max_length, Hkv, Dv).
    index: scalar int32, positions already filled.
    key: (batch..., n, Hkv, D) keys of the new positions.
    value: (batch..., n, Hkv, Dv) values of the new positions.

  Returns:
    (keys, values, length): the updated caches and index + n, the number of
    valid positions. Writing past max_length is not checked at run time
    (`dynamic_update_slice` clamps the start), as in Flax.
  """
  for name, new, cached in (("key", key, cached_key),
                            ("value", value, cached_value)):
    expected = cached.shape[:-3] + (new.shape[-3],) + cached.shape[-2:]
    if new.shape != expected or new.shape[-3] > cached.shape[-3]:
      raise ValueError(
          f"autoregressive cache shape error: the cache holds {name}s of "
          f"shape {cached.shape}, the new {name}s have shape {new.shape}")
  zero = jnp.zeros((), index.dtype)
  start = (zero,) * (key.ndim - 3) + (index, zero, zero)
  keys = jax.lax.dynamic_update_slice(cached_key, key.astype(cached_key.dtype),
                                      start)
  values = jax.lax.dynamic_update_slice(
      cached_value, value.astype(cached_value.dtype), start)
  return keys, values, index + key.shape[-3]


def check_decode_arguments(segment_ids: object, q_seq_lengths: object,
                           kv_seq_lengths: object) -> None:
  """Decoding derives the key lengths from the cache; nothing may override."""
  given = [name for name, x in (("segment_ids", segment_ids),
                                ("q_seq_lengths", q_seq_lengths),
                                ("kv_seq_lengths", kv_seq_lengths))
           if x is not None]
  if given:
    raise ValueError(
        f"{', '.join(given)} cannot be combined with decode=True: the cache "
        "index sets the key lengths; pass a boolean `mask` to hide cached "
        "positions instead")
