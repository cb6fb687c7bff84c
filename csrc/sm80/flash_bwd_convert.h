// Last backward kernel: dQ = softmax_scale * dq_accum, cast to T and written
// in the (B, Sq, H, D) layout; the CTAs of query block 0 also reduce dalibi.
//
// dalibi[b, h] = sum_ij dS_ij * (-|d_ij|) with dS_ij = P_ij (dP_ij - delta_i).
// The main kernel's delta = rowsum(dO * O) reads the stored 16-bit O; its
// rounding error would reach dalibi through the all-positive weights |d|
// (several percent at short windows). So the main kernel keeps per row
// A = sum_j P dP |d|, B = sum_j P |d|, C = sum_j P dP (= delta, exactly as
// the keys see it) and dalibi = sum_i ((C_i - dlse_i) B_i - A_i), dlse being
// the cotangent of lse (0 when none is given).
#pragma once

#include "common/flash.h"
#include "common/utils.h"
#include "sm80/flash_bwd_preprocess.h"

namespace jax_flash {

// dalibi[b, h] from the rows' sums (above), by the first warp of the CTA
// that calls it (the CTA of query block 0 of (b, h)).
__device__ __forceinline__ void reduce_dalibi_rows(const BwdParams& p,
                                                   const BwdScratch& s,
                                                   int64_t bh) {
  if (p.dalibi == nullptr || threadIdx.x >= 32) return;
  // One warp, fixed lane strides and shuffle tree: the same order on
  // every run.
  float total = 0.f;
  for (int i = threadIdx.x; i < p.seqlen_q; i += 32) {
    const int64_t row = bh * p.seqlen_q + i;
    const float4 r = s.dalibi_rows[row];
    const float delta = p.dlse != nullptr ? r.z - p.dlse[row] : r.z;
    total += delta * r.y - r.x;
  }
#pragma unroll
  for (int off = 16; off > 0; off /= 2) {
    total += __shfl_xor_sync(0xffffffffu, total, off);
  }
  if (threadIdx.x == 0) p.dalibi[bh] = total;
}

// One CTA of 256 threads per (block of kRows query rows, b, h): the rows'
// dq_accum is one contiguous block, read 16 bytes per thread with every load
// of a thread issued before its first store.
template <typename T, int kHeadDim, int kRows>
__global__ void __launch_bounds__(256)
bwd_convert_dq_kernel(const __grid_constant__ BwdParams p, BwdScratch s) {
  constexpr int kThreads = 256;
  constexpr int kVecsPerRow = kHeadDim / 4;  // float4 per row
  static_assert((kRows * kVecsPerRow) % kThreads == 0, "whole passes");
  constexpr int kPasses = kRows * kVecsPerRow / kThreads;
  const int b = blockIdx.y, h = blockIdx.z;
  const int64_t bh = static_cast<int64_t>(b) * p.num_heads + h;
  const int m0 = blockIdx.x * kRows;
  const int rows = min(kRows, p.seqlen_q - m0);
  const float4* acc = reinterpret_cast<const float4*>(
      s.dq_accum + (bh * p.seqlen_q + m0) * kHeadDim);
  float4 v[kPasses];
#pragma unroll
  for (int k = 0; k < kPasses; ++k) {
    const int c = threadIdx.x + k * kThreads;
    v[k] = c < rows * kVecsPerRow ? acc[c] : make_float4(0.f, 0.f, 0.f, 0.f);
  }
  T* dq = static_cast<T*>(p.dq) + b * p.dq_batch_stride +
          h * p.dq_head_stride;
  const float scale = p.softmax_scale;
#pragma unroll
  for (int k = 0; k < kPasses; ++k) {
    const int c = threadIdx.x + k * kThreads;
    if (c < rows * kVecsPerRow) {
      const int r = c / kVecsPerRow, col = (c % kVecsPerRow) * 4;
      *reinterpret_cast<uint2*>(dq + (m0 + r) * p.dq_row_stride + col) =
          make_uint2(pack2<T>(v[k].x * scale, v[k].y * scale),
                     pack2<T>(v[k].z * scale, v[k].w * scale));
    }
  }
  if (blockIdx.x == 0) reduce_dalibi_rows(p, s, bh);
}

}  // namespace jax_flash
