// The fixed order in which the backward's key tiles add into one query
// tile's float32 dQ in deterministic mode, shared by the sm80 and sm90
// kernels. A semaphore per (b, h, m), zeroed by the preprocess, holds 0
// until the first contributor to query tile m has added and then n + 1 for
// the contributor n that added last; each contributor waits for the value
// its predecessor leaves and then stores its own.
//
// Descending order (every kernel, every mask). The key tiles that see query
// tile m add to it in descending order of key tile index, and no other tile
// takes part. A key tile's CTA walks its query tiles upwards from the first
// one that sees it, and under a causal or sliding-window mask higher key
// tiles start at higher query tiles: tile n + 1 reaches query tile m some
// steps before tile n does and the wait costs nothing. (With the ascending
// order tile n waited at its first step for every lower tile to walk up to
// it.) Without a window every key tile starts at query tile 0, so tile n
// waits at its first step for the N - 1 - n tiles above it to add in turn.
// The launch maps blockIdx to key tiles in reverse (`dq_order_key_tile`),
// so that every tile a CTA waits for was launched before it: a CTA never
// waits for one that may not be resident yet.
//
// Cyclic order (sm90, no window bound, and only when the launch found that
// all N key tile CTAs of one (batch row, K/V head) fit on the GPU at once,
// twice over).
// Key tile n starts its walk at query tile s(n) = floor(n c / N) of the c
// it sees (all of them: no window) and wraps around, so at any step the N
// tiles are spread over the query tiles instead of queued on tile 0. Query
// tile r is reached first by n* = max{n : s(n) <= r} and then by
// n* - 1, ..., 0, N - 1, ..., n* + 1 (descending, cyclically): each tile's
// predecessor is the tile above it, n + 1 mod N, which reached r one or
// more steps earlier, so waits are normally already satisfied. Tiles wait
// for tiles launched after them here; that cannot deadlock while every
// tile of the group can be resident: blocks launch in grid order, groups
// before a CTA's own have all launched and depend on nothing later, and
// once they finish the rest of its group fits. Twice over, so that a second
// such launch on another stream cannot hold the rest of the GPU with its
// own partial group.
#pragma once

#include <cstdint>

#include "common/mask.h"

namespace jax_flash {

// Key tile of the CTA at grid position `index` of `count` key tiles: the
// highest first when `highest_first` (the descending order without a
// resident group), the lowest first otherwise (under a causal mask the
// longest CTAs first).
__host__ __device__ __forceinline__ int dq_order_key_tile(
    int index, int count, bool highest_first) {
  return highest_first ? count - 1 - index : index;
}

// The descending order: the value query tile m's semaphore holds when key
// tile n_block may add: 0 if no higher key tile sees m, else that
// next-higher contributor's index plus 1. Each CTA's own loop bounds come
// from the same AttentionMask::query_tiles call, so the two never disagree.
// The scan stops at the first contributor: one test at most steps; one per
// key tile above at the (one or two) query tiles where this tile is the
// highest contributor.
// tests/csrc/check_dq_order.cu checks both orders and that every launch
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

// Whether a batch row's mask takes the cyclic order: no window bound
// (every key tile sees every query tile) and a launch whose key tiles of
// one (b, h_kv) are resident together (`tiles_resident`).
__host__ __device__ __forceinline__ bool dq_order_cyclic(
    const AttentionMask& mask, bool tiles_resident) {
  return tiles_resident && mask.window_left < 0 && mask.window_right < 0;
}

// The query tile key tile n_block visits first among [m_begin, m_end), the
// tiles it sees: m_begin, or in the cyclic order m_begin + s(n).
__host__ __device__ __forceinline__ int dq_order_first_tile(
    const AttentionMask& mask, bool cyclic, int n_block, int block_n,
    int m_begin, int m_end) {
  if (!cyclic || m_end <= m_begin) return m_begin;
  const int tiles = ceil_div(mask.kv_len, block_n);  // those that see any
  return m_begin + static_cast<int>(static_cast<int64_t>(n_block) *
                                    (m_end - m_begin) / tiles);
}

// The cyclic order: the value query tile m's semaphore holds when key tile
// n_block may add: 0 for the first contributor n*, else (n_block + 1 mod
// N) + 1. Without a window the query tiles are [0, ceil(q_len / block_m))
// for each of the N = ceil(kv_len / block_n) key tiles.
__host__ __device__ __forceinline__ int dq_order_cyclic_ready_value(
    const AttentionMask& mask, int n_block, int block_n, int block_m, int m) {
  const int tiles = ceil_div(mask.kv_len, block_n);
  const int count = ceil_div(mask.q_len, block_m);
  // n* = max{n : floor(n count / tiles) <= m} = ceil((m + 1) tiles / count)
  // - 1, at most tiles - 1.
  const int64_t above = static_cast<int64_t>(m + 1) * tiles;
  const int first = min(tiles - 1,
                        static_cast<int>((above + count - 1) / count) - 1);
  if (n_block == first) return 0;
  return (n_block + 1 == tiles ? 0 : n_block + 1) + 1;
}

}  // namespace jax_flash
