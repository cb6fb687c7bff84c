"""Argument checks of `flash_attention`, run once at trace time.

Every check raises `TypeError` (wrong kind or dtype) or `ValueError` (wrong
shape or value) with a message naming the argument and what it got.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_flash.config import MAX_HEAD_DIM

FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
IMPLEMENTATIONS = (None, "xla", "reference", "cuda")


def _describe(x: Any) -> str:
  return f"shape {tuple(x.shape)} and dtype {x.dtype}"


def check_qkv(query: Any, key: Any, value: Any) -> None:
  """Ranks, shapes and dtypes of the three main operands."""
  for name, x in (("query", query), ("key", key), ("value", value)):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
      raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    if x.ndim not in (3, 4):
      raise ValueError(
          f"{name} must have rank 4 (B, S, N, H) or 3 (S, N, H), got "
          f"{_describe(x)}")
    if not any(x.dtype == d for d in FLOAT_DTYPES):
      raise TypeError(
          f"{name} must be float32, bfloat16 or float16, got {_describe(x)}")
  if not query.ndim == key.ndim == value.ndim:
    raise ValueError(
        "query, key and value must have the same rank, got query "
        f"{_describe(query)}, key {_describe(key)}, value {_describe(value)}")
  if not query.dtype == key.dtype == value.dtype:
    raise TypeError(
        "query, key and value must have the same dtype, got query "
        f"{_describe(query)}, key {_describe(key)}, value {_describe(value)}")
  batched = query.ndim == 4
  if batched and not query.shape[0] == key.shape[0] == value.shape[0]:
    raise ValueError(
        "query, key and value must have the same batch size, got query "
        f"{_describe(query)}, key {_describe(key)}, value {_describe(value)}")
  sq, heads, d = query.shape[-3:]
  sk, kv_heads, dk = key.shape[-3:]
  svk, v_heads, dv = value.shape[-3:]
  if sk != svk:
    raise ValueError(
        f"key and value must have the same length, got key {_describe(key)} "
        f"and value {_describe(value)}")
  if kv_heads != v_heads:
    raise ValueError(
        f"key and value must have the same number of heads, got key "
        f"{_describe(key)} and value {_describe(value)}")
  if d != dk:
    raise ValueError(
        f"query and key must have the same head dim, got query "
        f"{_describe(query)} and key {_describe(key)}")
  for name, x, size in (("query", query, sq), ("key", key, sk)):
    if size < 1:
      raise ValueError(
          f"{name} length must be at least 1, got {name} {_describe(x)}")
  if kv_heads < 1 or heads % kv_heads:
    raise ValueError(
        f"the number of query heads ({heads}) must be a multiple of the "
        f"number of key/value heads ({kv_heads}), got query "
        f"{_describe(query)} and key {_describe(key)}")
  for name, x, size in (("query", query, d), ("value", value, dv)):
    if not 1 <= size <= MAX_HEAD_DIM:
      raise ValueError(
          f"{name} head dim must be in [1, {MAX_HEAD_DIM}], got {name} "
          f"{_describe(x)}")


def check_static_float(name: str, value: Any, *, positive: bool = False
                       ) -> Optional[float]:
  """A Python number (or None) that selects the compiled program."""
  if value is None:
    return None
  if isinstance(value, jax.core.Tracer):
    raise TypeError(f"{name} must be a Python float known at trace time, "
                    f"got a traced value of {_describe(value)}")
  if not isinstance(value, (numbers.Real, np.ndarray, np.generic)) or (
      isinstance(value, bool)):
    raise TypeError(f"{name} must be a Python float known at trace time, "
                    f"got {type(value).__name__} {value!r}")
  value = float(value)
  if not math.isfinite(value) or (positive and value <= 0):
    kind = "a positive finite" if positive else "a finite"
    raise ValueError(f"{name} must be {kind} number, got {value}")
  return value


def check_window(window_size: Any) -> tuple[int, int]:
  """(left, right) with -1 for unbounded."""
  if window_size is None:
    return -1, -1
  if (not isinstance(window_size, Sequence) or len(window_size) != 2 or
      not all(isinstance(w, numbers.Integral) and not isinstance(w, bool)
              for w in window_size)):
    raise ValueError(
        f"window_size must be a pair of integers (left, right), got "
        f"{window_size!r}")
  left, right = (int(w) for w in window_size)
  if left < -1 or right < -1:
    raise ValueError(
        f"window_size entries must be >= 0, or -1 for unbounded, got "
        f"{window_size!r}")
  return left, right


def check_dropout(rate: Any, rng: Any) -> float:
  """The dropout rate in [0, 1); a key is required when it is positive."""
  rate = check_static_float("dropout_rate", rate) or 0.0
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"dropout_rate must be in [0, 1), got {rate}")
  if rate > 0 and rng is None:
    raise ValueError(
        f"dropout_rate={rate} needs a dropout_rng key, got dropout_rng=None")
  return rate


def check_implementation(implementation: Any) -> None:
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
        f"implementation must be one of {IMPLEMENTATIONS}, got "
        f"{implementation!r}")


def check_mask_array(name: str, x: Any, shape: tuple[int, ...], *,
                     integer: bool) -> jax.Array:
  """An integer (ids, lengths) or float (slopes) array of exactly `shape`."""
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    x = jnp.asarray(x)
  kind_ok = (jnp.issubdtype(x.dtype, jnp.integer) if integer else
             jnp.issubdtype(x.dtype, jnp.floating))
  if not kind_ok:
    kind = "an integer" if integer else "a floating-point"
    raise TypeError(f"{name} must be {kind} array, got {_describe(x)}")
  if tuple(x.shape) != shape:
    raise ValueError(
        f"{name} must have shape {shape}, got {_describe(x)}")
  return jnp.asarray(x, jnp.int32 if integer else jnp.float32)


def dropout_seed(rng: Any) -> jax.Array:
  """(2,) uint32 seed from a typed or raw PRNG key."""
  try:
    return jax.random.bits(rng, (2,), jnp.uint32)
  except (TypeError, ValueError) as e:
    raise TypeError(
        f"dropout_rng must be a jax.random key, got {type(rng).__name__}"
    ) from e
