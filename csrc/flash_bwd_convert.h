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

#include "flash.h"
#include "flash_bwd_preprocess.h"
#include "utils.h"

namespace jax_flash {

// One CTA per (block of kRows query rows, b, h).
template <typename T, int kHeadDim, int kRows>
__global__ void __launch_bounds__(256)
bwd_convert_dq_kernel(const __grid_constant__ BwdParams p, BwdScratch s) {
  constexpr int kChunks = kHeadDim / 4;  // float4 chunks per row
  const int b = blockIdx.y, h = blockIdx.z;
  const int64_t bh = static_cast<int64_t>(b) * p.num_heads + h;
  for (int c = threadIdx.x; c < kRows * kChunks; c += blockDim.x) {
    const int i = blockIdx.x * kRows + c / kChunks;
    const int col = (c % kChunks) * 4;
    if (i >= p.seqlen_q) break;
    const float4 v = *reinterpret_cast<const float4*>(
        s.dq_accum + (bh * p.seqlen_q + i) * kHeadDim + col);
    T* dq = static_cast<T*>(p.dq) + b * p.dq_batch_stride +
            i * p.dq_row_stride + h * p.dq_head_stride + col;
    const float scale = p.softmax_scale;
    *reinterpret_cast<uint2*>(dq) = make_uint2(
        pack2<T>(v.x * scale, v.y * scale), pack2<T>(v.z * scale, v.w * scale));
  }
  if (p.dalibi != nullptr && blockIdx.x == 0 && threadIdx.x < 32) {
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
}

}  // namespace jax_flash
