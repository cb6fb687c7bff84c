// Global -> shared tile copies with cp.async, shared by the forward and
// backward kernels.
#pragma once

#include <cstdint>

#include "common/utils.h"

namespace jax_flash {

// Copies a (kRows x kCols) tile from global memory (row pitch `stride`
// elements) into shared memory at byte address `smem` (row pitch kPitch
// elements); rows >= valid_rows are zero-filled and not read. Each of the
// kThreads threads copies whole 16-byte chunks at fixed columns of every
// kRowStep-th row, so every trip count is a compile-time constant and the
// addresses are one multiply-add per row: no division, no loop control.
// kFull: the caller knows valid_rows >= kRows (no predicates).
// Row 0 of `gmem` must be readable (it stands in for the rows not read).
template <typename T, int kRows, int kCols, int kPitch, int kThreads,
          bool kFull = false>
__device__ __forceinline__ void copy_rows_async(uint32_t smem, const T* gmem,
                                                int64_t stride,
                                                int valid_rows, int tid) {
  constexpr int kChunksPerRow = kCols / 8;  // 16-byte chunks
  constexpr int kThreadsPerRow = gcd(kChunksPerRow, kThreads);
  constexpr int kRowStep = kThreads / kThreadsPerRow;
  static_assert(kCols % 8 == 0, "rows of whole 16-byte chunks");
  static_assert(kRows % kRowStep == 0, "tile rows split evenly");
  const int row0 = tid / kThreadsPerRow;
  const int chunk0 = tid % kThreadsPerRow;
#pragma unroll
  for (int r = 0; r < kRows / kRowStep; ++r) {
    const int row = row0 + r * kRowStep;
    const bool ok = kFull || row < valid_rows;
    const T* src = gmem + (ok ? row : 0) * stride;
#pragma unroll
    for (int c = 0; c < kChunksPerRow / kThreadsPerRow; ++c) {
      const int col = (chunk0 + c * kThreadsPerRow) * 8;
      cp_async_16(smem + (row * kPitch + col) * sizeof(T), src + col, ok);
    }
  }
}

}  // namespace jax_flash
