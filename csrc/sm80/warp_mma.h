// Warp-level tensor-core products on shared-memory tiles (mma.sync
// m16n8k16, f32 accumulators), as the backward kernel uses them.
//
// A warp's accumulator tile is float acc[kM16][kN8][4]: element r of
// acc[mi][nj] sits at row mi * 16 + lane / 4 + 8 * (r / 2) and column
// nj * 8 + 2 * (lane % 4) + r % 2 of the warp's tile.
#pragma once

#include <cstdint>

#include "common/utils.h"

namespace jax_flash {

// acc (kM16*16 x kN8*8) += A (kM16*16 x kK) * B (kK x kN8*8), for one warp.
// `a` and `b` point at the warp's operand origin in shared memory; `lda` and
// `ldb` are row strides in elements. A is stored [m][k] or, with kAStoredKM,
// [k][m] (A is the transpose of the stored tile); B is stored [n][k] (the
// transpose of B, as K is for S = Q K^T) or, with kBStoredKN, [k][n].
template <int kM16, int kN8, int kK, bool kAStoredKM, bool kBStoredKN,
          typename T>
__device__ __forceinline__ void warp_mma(float (&acc)[kM16][kN8][4],
                                         const T* a, int lda, const T* b,
                                         int ldb) {
  static_assert(kN8 % 2 == 0, "B fragments are loaded two n8 tiles at once");
  static_assert(kK % 16 == 0, "the reduction runs in steps of 16");
  const int lane = threadIdx.x % 32;
  // Row and column this lane addresses inside a 16x16 block, for the two
  // orders the four 8x8 matrices of an x4 load come in.
  const int row_a = lane % 8 + 8 * ((lane / 8) % 2), col_a = 8 * (lane / 16);
  const int row_b = lane % 8 + 8 * (lane / 16), col_b = 8 * ((lane / 8) % 2);
#pragma unroll
  for (int k = 0; k < kK; k += 16) {
    uint32_t fa[kM16][4];
#pragma unroll
    for (int mi = 0; mi < kM16; ++mi) {
      // Stored [m][k]: matrices (m0-7,k0-7) (m8-15,k0-7) (m0-7,k8-15)
      // (m8-15,k8-15). Stored [k][m]: the same four, read transposed.
      const T* p = kAStoredKM
          ? a + (k + row_b) * lda + mi * 16 + col_b
          : a + (mi * 16 + row_a) * lda + k + col_a;
      if constexpr (kAStoredKM) {
        ldmatrix_x4_trans(fa[mi], smem_addr(p));
      } else {
        ldmatrix_x4(fa[mi], smem_addr(p));
      }
    }
#pragma unroll
    for (int nj = 0; nj < kN8; nj += 2) {
      // Registers: (tile nj, k0-7), (nj, k8-15), (nj+1, k0-7), (nj+1, k8-15).
      uint32_t fb[4];
      const T* p = kBStoredKN
          ? b + (k + row_a) * ldb + nj * 8 + col_a
          : b + (nj * 8 + row_b) * ldb + k + col_b;
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
