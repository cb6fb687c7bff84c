// First backward kernel: delta = rowsum(dO * O) - dlse per query row (the
// lse cotangent, if any, folds into delta: dS = P * (dP - delta)), and zeroed
// scratch (the float32 dQ accumulator, the dalibi row sums, the
// deterministic-order semaphores).
#pragma once

#include "flash.h"
#include "flash_bwd_tile_size.h"

namespace jax_flash {

// Pointers into the workspace operand, from `BwdWorkspaceLayout`.
struct BwdScratch {
  float* dq_accum;       // (B, H, Sq, D)
  float* delta;          // (B, H, Sq)
  int* dq_semaphore;     // (B, H, num_m_blocks); nullptr unless deterministic
  float4* dalibi_rows;   // (B, H, Sq)

  static BwdScratch make(const BwdParams& p) {
    const BwdWorkspaceLayout w = BwdWorkspaceLayout::make(
        p.batch, p.seqlen_q, p.num_heads, p.head_dim, p.deterministic);
    char* base = static_cast<char*>(p.workspace);
    return {reinterpret_cast<float*>(base + w.dq_accum),
            reinterpret_cast<float*>(base + w.delta),
            p.deterministic ? reinterpret_cast<int*>(base + w.dq_semaphore)
                            : nullptr,
            reinterpret_cast<float4*>(base + w.dalibi_rows)};
  }
};

// One CTA per (block of kRows query rows, b, h); one warp per row at a time.
// kRows equals the main kernel's kBlockM so that CTA x also owns semaphore x.
template <typename T, int kHeadDim, int kRows>
__global__ void __launch_bounds__(256)
bwd_preprocess_kernel(const __grid_constant__ BwdParams p, BwdScratch s) {
  constexpr int kChunks = kHeadDim / 8;  // 16-byte chunks per row
  static_assert(kChunks <= 32, "one warp covers a row in one pass");
  const int b = blockIdx.y, h = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t bh = static_cast<int64_t>(b) * p.num_heads + h;
  if (s.dq_semaphore != nullptr && threadIdx.x == 0) {
    s.dq_semaphore[bh * gridDim.x + blockIdx.x] = 0;
  }
  for (int r = warp; r < kRows; r += blockDim.x / 32) {
    const int i = blockIdx.x * kRows + r;
    if (i >= p.seqlen_q) break;
    float sum = 0.f;
    if (lane < kChunks) {
      const T* o = static_cast<const T*>(p.out) + b * p.out_batch_stride +
                   i * p.out_row_stride + h * p.out_head_stride + lane * 8;
      const T* d = static_cast<const T*>(p.dout) + b * p.dout_batch_stride +
                   i * p.dout_row_stride + h * p.dout_head_stride + lane * 8;
      const uint4 ov = *reinterpret_cast<const uint4*>(o);
      const uint4 dv = *reinterpret_cast<const uint4*>(d);
      const T* oe = reinterpret_cast<const T*>(&ov);
      const T* de = reinterpret_cast<const T*>(&dv);
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        sum += static_cast<float>(oe[e]) * static_cast<float>(de[e]);
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off /= 2) {
      sum += __shfl_xor_sync(0xffffffffu, sum, off);
    }
    const int64_t row = bh * p.seqlen_q + i;
    if (lane == 0) {
      s.delta[row] = p.dlse != nullptr ? sum - p.dlse[row] : sum;
      s.dalibi_rows[row] = make_float4(0.f, 0.f, 0.f, 0.f);
    }
    float4* acc = reinterpret_cast<float4*>(s.dq_accum + row * kHeadDim);
    for (int c = lane; c < kHeadDim / 4; c += 32) {
      acc[c] = make_float4(0.f, 0.f, 0.f, 0.f);
    }
  }
}

}  // namespace jax_flash
