// The sm90 forward's work tiles: their order, and how many CTAs run them.
//
// A work tile is (query tile of kBlockM rows, head, batch row). Tile t of
// a call follows the order of a plain (query tiles, heads, batch) grid with
// the query tiles of a head from the last one down, the longest first under
// a causal mask. The persistent grid has one CTA per SM (at most one per
// tile): CTA c runs tile c first and then claims tiles num_ctas, num_ctas +
// 1, ... from a counter, so the tiles in flight stay consecutive. Host and
// device code share these functions; tests/csrc/check_fwd_tiles.cu checks
// them on the host.
#pragma once

#include <cstdint>

namespace jax_flash {
namespace sm90 {

struct FwdTile {
  int m_block, h, b;

  __host__ __device__ __forceinline__ static FwdTile make(int t,
                                                          int num_m_blocks,
                                                          int num_heads) {
    const int head_row = t / num_m_blocks;
    return {num_m_blocks - 1 - (t - head_row * num_m_blocks),
            head_row % num_heads, head_row / num_heads};
  }
};

// Sentinel tile index: no more work.
constexpr int kNoTile = -1;

// CTAs of the launch: one per tile, or (persistent) one per SM at most.
__host__ __device__ constexpr int fwd_num_ctas(int64_t tiles, int num_sms,
                                               bool persistent) {
  return static_cast<int>(!persistent || tiles < num_sms
                              ? tiles : static_cast<int64_t>(num_sms));
}

}  // namespace sm90
}  // namespace jax_flash
