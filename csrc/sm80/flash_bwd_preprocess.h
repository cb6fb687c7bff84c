// First backward kernel: delta = rowsum(dO * O) - dlse per query row (the
// lse cotangent, if any, folds into delta: dS = P * (dP - delta)), and zeroed
// scratch (the float32 dQ accumulator, the dalibi row sums, the
// deterministic-order semaphores).
#pragma once

#include "common/flash.h"
#include "sm80/flash_bwd_tile_size.h"

namespace jax_flash {

// Pointers into the workspace operand, from `BwdWorkspaceLayout`.
struct BwdScratch {
  float* dq_accum;       // (B, H, Sq, D), or tiles when dq_tiled
  float* delta;          // (B, H, Sq)
  int* dq_semaphore;     // (B, H, num_m_blocks); nullptr unless deterministic
  float4* dalibi_rows;   // (B, H, Sq)
  float2* row_stats;     // (B, H, row_stats_pitch(Sq)): (lse log2 e, delta)
  // The preprocess fills row_stats (the sm90 kernel reads it).
  bool write_row_stats = false;
  // The main kernel stages dQ in shared memory for the bulk-copy engine
  // (flash_bwd_kernel.h); set by the launch, which sized shared memory so.
  bool dq_staged = false;
  // dq_accum holds whole tiles of kRows rows at the pitch
  // row_stats_pitch(Sq) (the sm90 kernel's order, sm90/bwd_dq_tile.h): the
  // preprocess zeroes whole tiles, padding rows included.
  bool dq_tiled = false;

  static BwdScratch make(const BwdParams& p) {
    const BwdWorkspaceLayout w = BwdWorkspaceLayout::make(
        p.batch, p.seqlen_q, p.num_heads, p.head_dim, p.deterministic);
    char* base = static_cast<char*>(p.workspace);
    return {reinterpret_cast<float*>(base + w.dq_accum),
            reinterpret_cast<float*>(base + w.delta),
            p.deterministic ? reinterpret_cast<int*>(base + w.dq_semaphore)
                            : nullptr,
            reinterpret_cast<float4*>(base + w.dalibi_rows),
            reinterpret_cast<float2*>(base + w.row_stats), false, false,
            false};
  }
};

// One CTA of 256 threads per (block of kRows query rows, b, h).
// kRows equals the main kernel's kBlockM so that CTA x also owns semaphore x.
// A group of kLanes lanes (a power of two) reads a row of O and dO, 16 bytes
// per lane, every group its own row; all the CTA's loads are issued before
// the first sum, and the rows' dq_accum (contiguous) is zeroed with 16-byte
// stores by all threads.
template <typename T, int kHeadDim, int kRows>
__global__ void __launch_bounds__(256)
bwd_preprocess_kernel(const __grid_constant__ BwdParams p, BwdScratch s) {
  constexpr int kThreads = 256;
  constexpr int kChunks = kHeadDim / 8;  // 16-byte chunks per row
  constexpr int kLanes = kChunks <= 4 ? 4 : kChunks <= 8 ? 8
                         : kChunks <= 16 ? 16 : 32;
  static_assert(kChunks <= 32, "a row in one pass of at most a warp");
  constexpr int kRowsPerPass = kThreads / kLanes;
  static_assert(kRows % kRowsPerPass == 0, "whole passes");
  constexpr int kPasses = kRows / kRowsPerPass;
  const int b = blockIdx.y, h = blockIdx.z;
  const int64_t bh = static_cast<int64_t>(b) * p.num_heads + h;
  if (s.dq_semaphore != nullptr && threadIdx.x == 0) {
    s.dq_semaphore[bh * gridDim.x + blockIdx.x] = 0;
  }
  const int m0 = blockIdx.x * kRows;
  const int lane = threadIdx.x % kLanes;
  const int row0 = threadIdx.x / kLanes;
  const T* out = static_cast<const T*>(p.out) + b * p.out_batch_stride +
                 h * p.out_head_stride + lane * 8;
  const T* dout = static_cast<const T*>(p.dout) + b * p.dout_batch_stride +
                  h * p.dout_head_stride + lane * 8;
  uint4 ov[kPasses], dv[kPasses];
#pragma unroll
  for (int k = 0; k < kPasses; ++k) {
    const int i = m0 + row0 + k * kRowsPerPass;
    const bool in = i < p.seqlen_q && lane < kChunks;
    ov[k] = in ? *reinterpret_cast<const uint4*>(out + i * p.out_row_stride)
               : make_uint4(0, 0, 0, 0);
    dv[k] = in ? *reinterpret_cast<const uint4*>(dout + i * p.dout_row_stride)
               : make_uint4(0, 0, 0, 0);
  }
#pragma unroll
  for (int k = 0; k < kPasses; ++k) {
    const T* oe = reinterpret_cast<const T*>(&ov[k]);
    const T* de = reinterpret_cast<const T*>(&dv[k]);
    float sum = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      sum += static_cast<float>(oe[e]) * static_cast<float>(de[e]);
    }
#pragma unroll
    for (int off = kLanes / 2; off > 0; off /= 2) {
      sum += __shfl_xor_sync(0xffffffffu, sum, off);
    }
    const int i = m0 + row0 + k * kRowsPerPass;
    if (lane == 0 && i < p.seqlen_q) {
      const int64_t row = bh * p.seqlen_q + i;
      const float delta = p.dlse != nullptr ? sum - p.dlse[row] : sum;
      s.delta[row] = delta;
      s.dalibi_rows[row] = make_float4(0.f, 0.f, 0.f, 0.f);
      if (s.write_row_stats) {
        // +inf for a row that sees no key, so that exp2(x - lse) = 0.
        const float lse = p.lse[row];
        s.row_stats[bh * row_stats_pitch(p.seqlen_q) + i] =
            make_float2(lse == -INFINITY ? INFINITY : lse * kLog2e, delta);
      }
    } else if (lane == 0 && s.write_row_stats) {
      // Rows past Sq up to the end of this block: loaded, never used.
      s.row_stats[bh * row_stats_pitch(p.seqlen_q) + i] =
          make_float2(INFINITY, 0.f);
    }
  }
  // Rows [m0, min(m0 + kRows, Sq)) of dq_accum (the whole tile when tiled):
  // one contiguous block.
  const int rows = s.dq_tiled ? kRows : min(kRows, p.seqlen_q - m0);
  const int64_t pitch = s.dq_tiled ? row_stats_pitch(p.seqlen_q) : p.seqlen_q;
  float4* acc = reinterpret_cast<float4*>(s.dq_accum +
                                          (bh * pitch + m0) * kHeadDim);
  constexpr int kVecsPerRow = kHeadDim / 4;
#pragma unroll
  for (int k = 0; k < kRows * kVecsPerRow / kThreads; ++k) {
    const int c = threadIdx.x + k * kThreads;
    if (c < rows * kVecsPerRow) acc[c] = make_float4(0.f, 0.f, 0.f, 0.f);
  }
}

}  // namespace jax_flash
