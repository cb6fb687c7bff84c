// Warp-level tensor-core products on shared-memory tiles (mma.sync
// m16n8k16, f32 accumulators), shared by the forward and backward kernels.
//
// A warp's accumulator tile is float acc[kM16][kN8][4]: element r of
// acc[mi][nj] sits at row mi * 16 + lane / 4 + 8 * (r / 2) and column
// nj * 8 + 2 * (lane % 4) + r % 2 of the warp's tile.
#pragma once

#include <cstdint>

#include "common/utils.h"

namespace jax_flash {

// Row and column this lane addresses inside a 16x16 block for an x4
// ldmatrix, in the two orders its four 8x8 matrices come in: "a" rows 0-7,
// 8-15, 0-7, 8-15 at columns 0, 0, 8, 8; "b" rows 0-7, 0-7, 8-15, 8-15 at
// columns 0, 8, 0, 8.
struct LdmatrixLane {
  int row_a, col_a, row_b, col_b;

  __device__ __forceinline__ static LdmatrixLane make() {
    const int lane = threadIdx.x % 32;
    return {lane % 8 + 8 * ((lane / 8) % 2), 8 * (lane / 16),
            lane % 8 + 8 * (lane / 16), 8 * ((lane / 8) % 2)};
  }
};

// Where element (row, col) of a shared-memory tile lies, in elements from
// the tile's origin, for the two layouts the kernels use. `col` is a
// multiple of 8 wherever ldmatrix addresses a row (16 bytes).
//
// PitchedTile: rows `pitch` elements apart (the sm80 kernels pad the pitch
// by 16 bytes so that the 8 rows of an ldmatrix hit different banks).
struct PitchedTile {
  int pitch;
  __host__ __device__ __forceinline__ int offset(int row, int col) const {
    return row * pitch + col;
  }
};

// Swizzled128Tile: the layout a TMA copy with 128-byte swizzling writes
// from a box of kRows rows x 64 columns per 128-byte chunk of the row: the
// columns in blocks of 64 (one kRows x 128-byte block after another), and
// inside a block the 16-byte piece c of row r at position c ^ (r % 8). The
// 8 rows of an ldmatrix thus hit 8 different bank groups without padding.
// The tile must start 1024-byte aligned (the swizzle follows the address).
template <int kRows, int kElementBytes = 2>
struct Swizzled128Tile {
  static constexpr int kBlockCols = 128 / kElementBytes;  // 64 for 16-bit
  static constexpr int kPieceCols = 16 / kElementBytes;   // 8
  __host__ __device__ __forceinline__ int offset(int row, int col) const {
    const int block = col / kBlockCols;
    const int piece = (col % kBlockCols) / kPieceCols;
    return (block * kRows + row) * kBlockCols +
           ((piece ^ (row % 8)) * kPieceCols) + col % kPieceCols;
  }
};

// acc (kM16*16 x kN8*8) += A (kM16*16 x 16) * B (16 x kN8*8) for one warp,
// the A fragments already in registers (e.g. probabilities computed there)
// and B rows [k, k + 16) of a shared-memory tile at `b` laid out as `tile`
// says, stored [n][k] (the transpose of B, as K is for S = Q K^T) or, with
// kBStoredKN, [k][n].
template <int kM16, int kN8, bool kBStoredKN, typename T, typename Tile>
__device__ __forceinline__ void warp_mma_a_in_registers(
    float (&acc)[kM16][kN8][4], const uint32_t (&fa)[kM16][4], const T* b,
    Tile tile, int k) {
  static_assert(kN8 % 2 == 0, "B fragments are loaded two n8 tiles at once");
  const LdmatrixLane l = LdmatrixLane::make();
#pragma unroll
  for (int nj = 0; nj < kN8; nj += 2) {
    // Registers: (tile nj, k0-7), (nj, k8-15), (nj+1, k0-7), (nj+1, k8-15).
    uint32_t fb[4];
    const T* p = kBStoredKN
        ? b + tile.offset(k + l.row_a, nj * 8 + l.col_a)
        : b + tile.offset(nj * 8 + l.row_b, k + l.col_b);
    if constexpr (kBStoredKN) {
      ldmatrix_x4_trans(fb, smem_addr(p));
    } else {
      ldmatrix_x4(fb, smem_addr(p));
    }
#pragma unroll
    for (int mi = 0; mi < kM16; ++mi) {
      mma_16816<T>(acc[mi][nj], fa[mi], fb[0], fb[1]);
      mma_16816<T>(acc[mi][nj + 1], fa[mi], fb[2], fb[3]);
    }
  }
}

// The same for a tile with rows `ldb` elements apart.
template <int kM16, int kN8, bool kBStoredKN, typename T>
__device__ __forceinline__ void warp_mma_a_in_registers(
    float (&acc)[kM16][kN8][4], const uint32_t (&fa)[kM16][4], const T* b,
    int ldb, int k) {
  warp_mma_a_in_registers<kM16, kN8, kBStoredKN>(acc, fa, b,
                                                 PitchedTile{ldb}, k);
}

// acc (kM16*16 x kN8*8) += A (kM16*16 x kK) * B (kK x kN8*8), for one warp.
// `a` and `b` point at the warp's operand origin in shared memory; `lda` is
// A's row stride in elements, `b_tile` B's layout (a PitchedTile, or a
// Swizzled128Tile whose origin is `b`). A is stored [m][k] or, with
// kAStoredKM, [k][m] (A is the transpose of the stored tile); B as in
// warp_mma_a_in_registers.
template <int kM16, int kN8, int kK, bool kAStoredKM, bool kBStoredKN,
          typename T, typename BTile>
__device__ __forceinline__ void warp_mma(float (&acc)[kM16][kN8][4],
                                         const T* a, int lda, const T* b,
                                         BTile b_tile) {
  static_assert(kK % 16 == 0, "the reduction runs in steps of 16");
  const LdmatrixLane l = LdmatrixLane::make();
#pragma unroll
  for (int k = 0; k < kK; k += 16) {
    uint32_t fa[kM16][4];
#pragma unroll
    for (int mi = 0; mi < kM16; ++mi) {
      // Stored [m][k]: matrices (m0-7,k0-7) (m8-15,k0-7) (m0-7,k8-15)
      // (m8-15,k8-15). Stored [k][m]: the same four, read transposed.
      const T* p = kAStoredKM
          ? a + (k + l.row_b) * lda + mi * 16 + l.col_b
          : a + (mi * 16 + l.row_a) * lda + k + l.col_a;
      if constexpr (kAStoredKM) {
        ldmatrix_x4_trans(fa[mi], smem_addr(p));
      } else {
        ldmatrix_x4(fa[mi], smem_addr(p));
      }
    }
    warp_mma_a_in_registers<kM16, kN8, kBStoredKN>(acc, fa, b, b_tile, k);
  }
}

// The same with B's rows `ldb` elements apart.
template <int kM16, int kN8, int kK, bool kAStoredKM, bool kBStoredKN,
          typename T>
__device__ __forceinline__ void warp_mma(float (&acc)[kM16][kN8][4],
                                         const T* a, int lda, const T* b,
                                         int ldb) {
  warp_mma<kM16, kN8, kK, kAStoredKM, kBStoredKN>(acc, a, lda, b,
                                                  PitchedTile{ldb});
}

// The A fragments of k16 step kk of P (kM16*16 x kN8*8) from its accumulator
// tile: the C layout of n8 tiles 2kk and 2kk+1 is the A layout of that step,
// so probabilities computed in registers feed the next product directly.
template <typename T, int kM16, int kN8>
__device__ __forceinline__ void accumulator_as_a(
    const float (&c)[kM16][kN8][4], int kk, uint32_t (&fa)[kM16][4]) {
#pragma unroll
  for (int mi = 0; mi < kM16; ++mi) {
    fa[mi][0] = pack2<T>(c[mi][2 * kk][0], c[mi][2 * kk][1]);
    fa[mi][1] = pack2<T>(c[mi][2 * kk][2], c[mi][2 * kk][3]);
    fa[mi][2] = pack2<T>(c[mi][2 * kk + 1][0], c[mi][2 * kk + 1][1]);
    fa[mi][3] = pack2<T>(c[mi][2 * kk + 1][2], c[mi][2 * kk + 1][3]);
  }
}

template <int kM16, int kN8>
__device__ __forceinline__ void zero(float (&acc)[kM16][kN8][4]) {
#pragma unroll
  for (int mi = 0; mi < kM16; ++mi)
#pragma unroll
    for (int nj = 0; nj < kN8; ++nj)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[mi][nj][r] = 0.f;
}

}  // namespace jax_flash
