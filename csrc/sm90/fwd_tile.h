// The sm90 forward's work tiles: their order, and how many CTAs run them.
//
// A work tile is (query tile of kBlockM rows, head, batch row). The (head,
// batch row) pairs ("rows" here, head fastest) are cut into sections of
// `section_rows` consecutive rows; tile t of a call runs the sections in
// turn and, within a section, the query tiles from the last one down, each
// over every row of the section. With one row a section the order is a
// plain grid's: the query tiles of a head from the last one down, then the
// next head. Under a causal mask the last query tiles are the longest, and
// the kernel takes fwd_section_rows (about as many tiles as the GPU runs at
// once): each section runs longest first, so the call ends with short tiles
// instead of whichever tile the last head happened to reach, and a
// section's K/V (a few heads) stays in L2. The persistent grid has one CTA
// per SM (at most one per tile): CTA c runs tile c first and then claims
// tiles num_ctas, num_ctas + 1, ... from a counter, so the tiles in flight
// stay consecutive. Host and device code share these functions;
// tests/csrc/check_fwd_tiles.cu checks them on the host.
#pragma once

#include <cstdint>

namespace jax_flash {
namespace sm90 {

// Rows (head, batch row pairs) per section: enough that a section's tiles
// fill the GPU's num_sms CTA slots, and at least one.
__host__ __device__ __forceinline__ int fwd_section_rows(int num_m_blocks,
                                                         int num_sms) {
  return num_sms > num_m_blocks ? num_sms / num_m_blocks : 1;
}

struct FwdTile {
  int m_block, h, b;

  // Tile t of num_m_blocks * num_heads * batch; section_rows from
  // fwd_section_rows.
  __host__ __device__ __forceinline__ static FwdTile make(
      int t, int num_m_blocks, int num_heads, int batch, int section_rows) {
    const int section_tiles = section_rows * num_m_blocks;
    const int section = t / section_tiles;
    const int first_row = section * section_rows;
    const int rows_left = num_heads * batch - first_row;
    const int rows = section_rows < rows_left ? section_rows : rows_left;
    const int r = t - section * section_tiles;  // tile within the section
    const int m_rank = r / rows;
    const int row = first_row + (r - m_rank * rows);
    return {num_m_blocks - 1 - m_rank, row % num_heads, row / num_heads};
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
