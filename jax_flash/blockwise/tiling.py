"""Block sizes and the ranges of blocks a mask leaves anything visible in.

Only (query block, key block) pairs inside these ranges are computed, so a
causal mask costs about half of full attention and a sliding window costs
O(S * window). The ranges are conservative over the batch (lengths make the
diagonal offset differ per batch row); the element masks do the rest.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jax_flash import masking
from jax_flash.config import AttentionConfig, MaskArrays

# 512 x 512 tiles keep one float32 score tile per (batch, head) at 1 MiB:
# large enough that per-iteration loop overhead is small on CPU, small enough
# that temporaries stay far below an Sq x Sk array at long lengths.
DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_K = 512


@dataclasses.dataclass(frozen=True)
class Tiling:
  """How a (Sq, Sk) problem is cut into blocks."""

  sq: int
  sk: int
  block_q: int
  block_k: int

  @classmethod
  def create(cls, sq: int, sk: int, block_q: int | None = None,
             block_k: int | None = None) -> "Tiling":
    bq = min(block_q or DEFAULT_BLOCK_Q, sq)
    bk = min(block_k or DEFAULT_BLOCK_K, sk)
    return cls(sq, sk, bq, bk)

  @property
  def num_q_blocks(self) -> int:
    return -(-self.sq // self.block_q)

  @property
  def num_k_blocks(self) -> int:
    return -(-self.sk // self.block_k)

  @property
  def padded_sq(self) -> int:
    return self.num_q_blocks * self.block_q

  @property
  def padded_sk(self) -> int:
    return self.num_k_blocks * self.block_k


def _offset_bounds(masks: MaskArrays, batch: int, sq: int,
                   sk: int) -> tuple[jax.Array, jax.Array]:
  offset = masking.diagonal_offset(masks, batch, sq, sk)
  return jnp.min(offset), jnp.max(offset)


def _last_key(masks: MaskArrays, batch: int, sk: int) -> jax.Array:
  return jnp.max(masking.lengths_or_full(masks.kv_lengths, batch, sk)) - 1


def _last_query(masks: MaskArrays, batch: int, sq: int) -> jax.Array:
  return jnp.max(masking.lengths_or_full(masks.q_lengths, batch, sq)) - 1


def key_block_range(tiling: Tiling, config: AttentionConfig,
                    masks: MaskArrays, batch: int,
                    q_block: jax.Array) -> tuple[jax.Array, jax.Array]:
  """[first, end) key blocks that query block `q_block` can see."""
  left, right = config.effective_window
  lo_off, hi_off = _offset_bounds(masks, batch, tiling.sq, tiling.sk)
  first_q = q_block * tiling.block_q
  last_q = first_q + tiling.block_q - 1
  first_k = first_q + lo_off - left if left >= 0 else jnp.int32(0)
  last_k = _last_key(masks, batch, tiling.sk)
  if right >= 0:
    last_k = jnp.minimum(last_k, last_q + hi_off + right)
  return _block_span(first_k, last_k, tiling.block_k, tiling.num_k_blocks)


def query_block_range(tiling: Tiling, config: AttentionConfig,
                      masks: MaskArrays, batch: int,
                      k_block: jax.Array) -> tuple[jax.Array, jax.Array]:
  """[first, end) query blocks that can see key block `k_block`."""
  left, right = config.effective_window
  lo_off, hi_off = _offset_bounds(masks, batch, tiling.sq, tiling.sk)
  first_k = k_block * tiling.block_k
  last_k = first_k + tiling.block_k - 1
  # Query i sees key j iff j - offset - right <= i <= j - offset + left.
  first_q = first_k - hi_off - right if right >= 0 else jnp.int32(0)
  last_q = _last_query(masks, batch, tiling.sq)
  if left >= 0:
    last_q = jnp.minimum(last_q, last_k - lo_off + left)
  return _block_span(first_q, last_q, tiling.block_q, tiling.num_q_blocks)


def _block_span(first: jax.Array, last: jax.Array, block: int,
                num_blocks: int) -> tuple[jax.Array, jax.Array]:
  start = jnp.clip(jnp.floor_divide(first, block), 0, num_blocks)
  end = jnp.clip(jnp.floor_divide(last, block) + 1, 0, num_blocks)
  return start.astype(jnp.int32), jnp.maximum(start, end).astype(jnp.int32)


def block_positions(block: jax.Array, size: int) -> jax.Array:
  """(size,) int32 global positions of block number `block`."""
  return block * size + jnp.arange(size, dtype=jnp.int32)


def tile_logits(q_blk: jax.Array, k_blk: jax.Array, config: AttentionConfig,
                masks: MaskArrays, q_pos: jax.Array, k_pos: jax.Array,
                tiling: Tiling) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(S = Q K^T, logits, visible) of one (query block, key block) tile.

  q_blk (B, Hkv, G, bq, D) and k_blk (B, Hkv, bk, D); S and logits are
  (B, Hkv, G, bq, bk) float32, see `masking.modify_and_mask`.
  """
  s = jnp.einsum("bhgqd,bhkd->bhgqk", q_blk, k_blk,
                 preferred_element_type=jnp.float32)
  logits, visible = masking.modify_and_mask(s, config, masks, q_pos, k_pos,
                                            tiling.sq, tiling.sk)
  return s, logits, visible
