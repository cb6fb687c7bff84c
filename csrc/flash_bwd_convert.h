// Last backward kernel: dQ = softmax_scale * dq_accum, cast to T and written
// in the (B, Sq, H, D) layout; the CTAs of query block 0 also sum the per
// key tile dalibi partials in a fixed order.
#pragma once

#include "flash.h"
#include "flash_bwd_preprocess.h"
#include "utils.h"

namespace jax_flash {

// One CTA per (block of kRows query rows, b, h).
template <typename T, int kHeadDim, int kRows>
__global__ void __launch_bounds__(256)
bwd_convert_dq_kernel(const __grid_constant__ BwdParams p, BwdScratch s,
                      int num_n_blocks) {
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
  if (p.dalibi != nullptr && blockIdx.x == 0 && threadIdx.x == 0) {
    // Sequential sum: the same order on every run.
    float total = 0.f;
    for (int n = 0; n < num_n_blocks; ++n) {
      total += s.dalibi_partial[bh * num_n_blocks + n];
    }
    p.dalibi[bh] = total;
  }
}

}  // namespace jax_flash
