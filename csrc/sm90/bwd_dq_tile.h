// The order of the sm90 backward's float32 dQ tiles (kBlockM = 64 query rows
// by D) in shared memory and in the workspace's dq_accum.
//
// Each consumer warpgroup holds a 64 x D/2 accumulator of dQ (MmaDq; warp w,
// lane l, value v = e0 + 2 e1 + 4 j: row 16 w + l / 4 + 8 e1, column
// 8 j + 2 (l % 4) + e0 of its half). It stores float4 j of thread t at
// (j * 128 + t) * 4 of its half: every warp writes 512 contiguous bytes per
// store (no bank conflict), and each half is one contiguous block, added to
// the workspace by one bulk reduction. The workspace keeps the same order
// (tile of rows [m0, m0 + 64) of head bh at (bh * row_stats_pitch(Sq) + m0) *
// D), so the convert kernel finds an element with `dq_tile_position`.
#pragma once

namespace jax_flash {
namespace sm90 {

constexpr int kDqTileRows = 64;

// Flat float index of float4 j of warpgroup thread t in half `half` of a dQ
// tile with head dim D: where the kernel stages that part of the
// accumulator.
template <int kHeadDim>
__host__ __device__ constexpr int dq_tile_index(int half, int j, int t) {
  return half * kDqTileRows * (kHeadDim / 2) + (j * 128 + t) * 4;
}

// (row, column) of flat float index `f` of a dQ tile with head dim D.
template <int kHeadDim>
__host__ __device__ constexpr void dq_tile_position(int f, int* row,
                                                    int* col) {
  constexpr int kHalfD = kHeadDim / 2;
  constexpr int kHalf = kDqTileRows * kHalfD;  // floats per warpgroup half
  const int half = f / kHalf, in_half = f % kHalf;
  const int j = in_half / 512, t = (in_half % 512) / 4, e = in_half % 4;
  const int w = t / 32, l = t % 32;
  *row = 16 * w + l / 4 + 8 * (e / 2);
  *col = half * kHalfD + 8 * j + 2 * (l % 4) + e % 2;
}

}  // namespace sm90
}  // namespace jax_flash
