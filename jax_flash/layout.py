"""Moving between the public (B, S, H, D) layout and grouped head-major tiles.

Internally queries are (B, Hkv, G, S, D) with G = H // Hkv query heads per
key/value head, and keys/values (B, Hkv, S, D): every score contraction is
then a batched matmul over (B, Hkv) and GQA never repeats K or V.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def group_queries(x: jax.Array, kv_heads: int) -> jax.Array:
  """(B, S, H, D) -> (B, Hkv, G, S, D)."""
  b, s, h, d = x.shape
  return x.reshape(b, s, kv_heads, h // kv_heads, d).transpose(0, 2, 3, 1, 4)


def ungroup_queries(x: jax.Array) -> jax.Array:
  """(B, Hkv, G, S, D) -> (B, S, H, D); inverse of `group_queries`."""
  b, hkv, g, s, d = x.shape
  return x.transpose(0, 3, 1, 2, 4).reshape(b, s, hkv * g, d)


def heads_major(x: jax.Array) -> jax.Array:
  """(B, S, Hkv, D) -> (B, Hkv, S, D)."""
  return x.transpose(0, 2, 1, 3)


def seq_major(x: jax.Array) -> jax.Array:
  """(B, Hkv, S, D) -> (B, S, Hkv, D); inverse of `heads_major`."""
  return x.transpose(0, 2, 1, 3)


def pad_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
  """Zero-pads `axis` of x up to `size`."""
  extra = size - x.shape[axis]
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths)


def safe_log_normalizer(m: jax.Array, l: jax.Array
                        ) -> tuple[jax.Array, jax.Array]:
  """(1 / l, lse) of softmax rows with running max m and sum l.

  Rows with nothing visible (l == 0) get 1/l = 0 so their output is 0, and
  lse = -inf; nothing here produces NaN or an infinite gradient.
  """
  empty = l == 0
  safe_l = jnp.where(empty, 1.0, l)
  inv_l = jnp.where(empty, 0.0, 1.0 / safe_l)
  lse = jnp.where(empty, -jnp.inf, m + jnp.log(safe_l))
  return inv_l, lse


def finite_or_zero(m: jax.Array) -> jax.Array:
  """Running max with -inf (nothing visible yet) replaced by 0."""
  return jnp.where(jnp.isneginf(m), 0.0, m)


def zeros_varying_like(shape: tuple[int, ...], *arrays) -> jax.Array:
  """float32 zeros of `shape` that vary wherever any of `arrays` varies.

  Loop carries must have the same type as the loop body's results; inside
  `shard_map` that type includes the mesh axes a value varies over, and plain
  `jnp.zeros` varies over none. Adding a zero derived from each input gives
  the initial carry exactly the variance of what the loop computes from them.
  """
  z = jnp.zeros(shape, jnp.float32)
  for a in jax.tree_util.tree_leaves(arrays):
    z = z + jnp.zeros_like(a, jnp.float32).reshape(-1)[:1]
  return z
