"""Mask and score-modifier semantics, written once for every JAX path.

The reference and the blockwise implementation both call these functions on
a tile of the score matrix: the reference on one tile covering everything,
the blockwise path on each (query block, key block) pair. Scores are laid out
as (B, Hkv, G, bq, bk) with G = H // Hkv query heads per key/value head.

For batch row b, `offset[b] = kv_len[b] - q_len[b]` aligns the last query with
the last key (bottom-right), and `d = i + offset[b] - j` is the signed distance
of key j to the aligned diagonal of query i. A call that is one block of a
larger problem gives the positions of its first query and key there
(`MaskArrays.q_offset`, `kv_offset`); they add q_offset - kv_offset to the
offset, so d is the distance in the larger problem.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from jax_flash.config import AttentionConfig, MaskArrays


def lengths_or_full(lengths: Optional[jax.Array], batch: int,
                    full: int) -> jax.Array:
  """(B,) int32 lengths clipped to [0, full]; `full` when none were given."""
  if lengths is None:
    return jnp.full((batch,), full, jnp.int32)
  return jnp.clip(lengths.astype(jnp.int32), 0, full)


def position_shift(masks: MaskArrays) -> Optional[jax.Array]:
  """() int32 q_offset - kv_offset (an absent one counts 0), or None when
  neither is given."""
  if masks.q_offset is None and masks.kv_offset is None:
    return None
  position = lambda x: jnp.asarray(0 if x is None else x, jnp.int32)
  return position(masks.q_offset) - position(masks.kv_offset)


def diagonal_offset(masks: MaskArrays, batch: int, sq: int,
                    sk: int) -> jax.Array:
  """(B,) int32 offset kv_len - q_len + q_offset - kv_offset: query i sits
  on the diagonal at key i + offset (bottom-right aligned)."""
  offset = (lengths_or_full(masks.kv_lengths, batch, sk) -
            lengths_or_full(masks.q_lengths, batch, sq))
  shift = position_shift(masks)
  return offset if shift is None else offset + shift


def window_sees(config: AttentionConfig, min_distance: jax.Array,
                max_distance: jax.Array) -> jax.Array:
  """Whether causal and window leave some distance d in [min, max] visible.

  Key j is visible to query i when -right <= d <= left (d as above, with
  `config.effective_window`; -1 leaves a side unbounded).
  """
  left, right = config.effective_window
  sees = jnp.asarray(True)
  if left >= 0:
    sees = sees & (min_distance <= left)
  if right >= 0:
    sees = sees & (max_distance >= -right)
  return sees


def modify_and_mask(scores: jax.Array, config: AttentionConfig,
                    masks: MaskArrays, q_pos: jax.Array, k_pos: jax.Array,
                    sq: int, sk: int) -> tuple[jax.Array, jax.Array]:
  """Turns raw q.k products of one tile into logits and their visibility.

  Args:
    scores: (B, Hkv, G, bq, bk) float32, q.k without the softmax scale.
    config: the static options.
    masks: the dynamic mask arrays (batched).
    q_pos: (bq,) int32 global query positions of the tile rows.
    k_pos: (bk,) int32 global key positions of the tile columns.
    sq: the true (unpadded) query length.
    sk: the true (unpadded) key length.

  Returns:
    (logits, visible): logits (B, Hkv, G, bq, bk) float32 after scale,
    softcap and alibi; visible, boolean and broadcastable to logits, True
    where query i may attend to key j.
  """
  batch = scores.shape[0]
  logits = scores * config.softmax_scale
  if config.softcap > 0:
    logits = config.softcap * jnp.tanh(logits / config.softcap)
  distance = _distance(masks, batch, sq, sk, q_pos, k_pos)
  if masks.alibi_slopes is not None:
    slopes = masks.alibi_slopes.reshape(scores.shape[:3] + (1, 1))
    logits = logits - slopes * jnp.abs(distance).astype(jnp.float32)
  return logits, _visible(config, masks, batch, sq, sk, q_pos, k_pos,
                          distance)


def softcap_derivative(scores: jax.Array, config: AttentionConfig) -> jax.Array:
  """d logits / d (scaled scores) of the softcap, 1 - tanh^2; 1 without it."""
  if config.softcap <= 0:
    return jnp.ones((), jnp.float32)
  t = jnp.tanh(scores * (config.softmax_scale / config.softcap))
  return 1.0 - t * t


def alibi_distance(masks: MaskArrays, batch: int, sq: int, sk: int,
                   q_pos: jax.Array, k_pos: jax.Array) -> jax.Array:
  """(B, 1, 1, bq, bk) float32 |d|, the factor of -slope in the logits."""
  return jnp.abs(_distance(masks, batch, sq, sk, q_pos, k_pos)).astype(
      jnp.float32)


def _distance(masks: MaskArrays, batch: int, sq: int, sk: int,
              q_pos: jax.Array, k_pos: jax.Array) -> jax.Array:
  offset = diagonal_offset(masks, batch, sq, sk)
  return (q_pos[None, None, None, :, None] +
          offset[:, None, None, None, None] -
          k_pos[None, None, None, None, :])


def _visible(config: AttentionConfig, masks: MaskArrays, batch: int, sq: int,
             sk: int, q_pos: jax.Array, k_pos: jax.Array,
             distance: jax.Array) -> jax.Array:
  q_len = lengths_or_full(masks.q_lengths, batch, sq)
  kv_len = lengths_or_full(masks.kv_lengths, batch, sk)
  visible = ((q_pos[None, :, None] < q_len[:, None, None]) &
             (k_pos[None, None, :] < kv_len[:, None, None]))
  visible = visible[:, None, None]
  left, right = config.effective_window
  if left >= 0:
    visible = visible & (distance <= left)
  if right >= 0:
    visible = visible & (distance >= -right)
  if masks.q_segment_ids is not None:
    q_ids = _take(masks.q_segment_ids, q_pos, sq)
    kv_ids = _take(masks.kv_segment_ids, k_pos, sk)
    same = q_ids[:, :, None] == kv_ids[:, None, :]
    visible = visible & same[:, None, None]
  return visible


def _take(ids: jax.Array, pos: jax.Array, length: int) -> jax.Array:
  """ids[:, pos] with positions past the end clamped (they are masked)."""
  return jnp.take(ids, jnp.minimum(pos, length - 1), axis=1)


# Dropout. The keep mask is a counter-based hash of (seed, batch, head, query,
# key), so any tiling of the score matrix (and any kernel that implements the
# same hash) draws the same mask, in the forward and in the backward.

_GOLDEN = 0x9E3779B9
_KEY_MULT = 0x85EBCA6B


def _mix32(x: jax.Array) -> jax.Array:
  """A 32-bit integer finalizer with good avalanche (xorshift-multiply)."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def dropout_threshold(rate: float) -> int:
  """uint32 threshold: an element is dropped iff its hash < threshold."""
  return min(int(round(rate * 2.0**32)), 2**32 - 1)


def dropout_keep(seed: jax.Array, rate: float, num_heads: int,
                 shape: tuple[int, int, int], q_pos: jax.Array,
                 k_pos: jax.Array) -> jax.Array:
  """Boolean keep mask (B, Hkv, G, bq, bk) of one tile.

  Args:
    seed: (2,) uint32 drawn from the dropout key.
    rate: drop probability.
    num_heads: H, the number of query heads.
    shape: (B, Hkv, G) of the scores.
    q_pos: (bq,) global query positions.
    k_pos: (bk,) global key positions.
  """
  batch, kv_heads, groups = shape
  seed = seed.astype(jnp.uint32)
  b = jnp.arange(batch, dtype=jnp.uint32)[:, None]
  h = jnp.arange(kv_heads * groups, dtype=jnp.uint32)[None, :]
  head_key = _mix32(seed[0] ^ _mix32(b * jnp.uint32(num_heads) + h + seed[1]))
  head_key = head_key.reshape(batch, kv_heads, groups, 1)
  row_key = _mix32(head_key + q_pos.astype(jnp.uint32) * jnp.uint32(_GOLDEN))
  col = k_pos.astype(jnp.uint32) * jnp.uint32(_KEY_MULT) + seed[1]
  bits = _mix32(row_key[..., None] ^ col)
  return bits >= jnp.uint32(dropout_threshold(rate))
