// The fixed order in which the backward's key tiles add into one query
// tile's float32 dQ in deterministic mode, shared by the sm80 and sm90
// kernels.
//
// The key tiles that see query tile m add to it in descending order of key
// tile index, and no other tile takes part. A semaphore per (b, h, m), zeroed
// by the preprocess, holds 0 until the first (highest) contributor has added
// and then n + 1 for the contributor n that added last; contributor n waits
// for `dq_order_ready_value` and then stores n + 1.
//
// Why descending: a key tile's CTA walks its query tiles upwards from the
// first one that sees it, and under a causal or sliding-window mask higher
// key tiles start at higher query tiles. Tile n + 1 therefore reaches query
// tile m some steps before tile n does and the wait costs nothing; with the
// ascending order tile n waited at its first step for every lower tile to
// walk up to it. The launch maps blockIdx to key tiles in reverse
// (`dq_order_key_tile`), so that every tile a CTA waits for was launched
// before it: a CTA never waits for one that may not be resident yet.
#pragma once

#include "common/mask.h"

namespace jax_flash {

// Key tile of the CTA at grid position `index` of `count` key tiles: the
// highest first in deterministic mode, the lowest first otherwise (under a
// causal mask the longest CTAs first).
__host__ __device__ __forceinline__ int dq_order_key_tile(
    int index, int count, bool deterministic) {
  return deterministic ? count - 1 - index : index;
}

// The value query tile m's semaphore holds when key tile n_block may add:
// 0 if no higher key tile sees m, else that next-higher contributor's index
// plus 1. Each CTA's own loop bounds come from the same
// AttentionMask::query_tiles call, so the two never disagree. The scan stops
// at the first contributor: one test at most steps; one per key tile above
// at the (one or two) query tiles where this tile is the highest
// contributor.
// tests/csrc/check_dq_order.cu checks the order and that every launch
// finishes, on the host, for many masks.
__host__ __device__ __forceinline__ int dq_order_ready_value(
    const AttentionMask& mask, int n_block, int num_n_blocks, int block_n,
    int block_m, int m) {
  for (int n = n_block + 1; n < num_n_blocks; ++n) {
    int m_begin, m_end;
    mask.query_tiles(n * block_n, (n + 1) * block_n, block_m, &m_begin,
                     &m_end);
    if (m_begin <= m && m < m_end) return n + 1;
  }
  return 0;
}

}  // namespace jax_flash
