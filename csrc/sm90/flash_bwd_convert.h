// Last kernel of the sm90 backward: dQ = softmax_scale * dq_accum, read in
// the tile order of bwd_dq_tile.h, cast to T and written in the (B, Sq, H, D)
// layout; the CTAs of query block 0 also reduce dalibi (as the sm80 convert).
#pragma once

#include "common/flash.h"
#include "common/utils.h"
#include "sm80/flash_bwd_convert.h"  // reduce_dalibi_rows
#include "sm80/flash_bwd_preprocess.h"
#include "sm90/bwd_dq_tile.h"

namespace jax_flash {
namespace sm90 {

// One CTA of 256 threads per (64-row tile, b, h). Each float4 of the tile
// holds columns (c, c + 1) of rows r and r + 8 (bwd_dq_tile.h): scaled and
// cast, they go through shared memory (conflict-free 4-byte stores, a row
// pitch of D + 8 elements) so that every thread then writes 16 contiguous
// bytes of one row, and a warp whole rows. Written straight from the tile
// order, a warp's store covered eight rows with 16 bytes each: half-filled
// 32-byte sectors, and the kernel took 2.4x as long on an H200. All loads of
// a thread are issued before its first store.
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(256)
bwd_convert_dq_tiled_kernel(const __grid_constant__ BwdParams p,
                            BwdScratch s) {
  constexpr int kThreads = 256;
  constexpr int kVecs = kDqTileRows * kHeadDim / 4;
  static_assert(kVecs % kThreads == 0, "whole passes");
  constexpr int kPasses = kVecs / kThreads;
  constexpr int kPitch = kHeadDim + 8;       // elements of T
  constexpr int kChunksPerRow = kHeadDim / 8;  // 16-byte chunks
  static_assert((kDqTileRows * kChunksPerRow) % kThreads == 0,
                "whole passes");
  __shared__ __align__(16) T tile[kDqTileRows * kPitch];
  const int b = blockIdx.y, h = blockIdx.z;
  const int64_t bh = static_cast<int64_t>(b) * p.num_heads + h;
  const int m0 = blockIdx.x * kDqTileRows;
  const float4* acc = reinterpret_cast<const float4*>(
      s.dq_accum + (bh * row_stats_pitch(p.seqlen_q) + m0) * kHeadDim);
  float4 v[kPasses];
#pragma unroll
  for (int k = 0; k < kPasses; ++k) v[k] = acc[threadIdx.x + k * kThreads];
  const float scale = p.softmax_scale;
#pragma unroll
  for (int k = 0; k < kPasses; ++k) {
    int r, c;
    dq_tile_position<kHeadDim>(4 * (threadIdx.x + k * kThreads), &r, &c);
    *reinterpret_cast<uint32_t*>(&tile[r * kPitch + c]) =
        pack2<T>(v[k].x * scale, v[k].y * scale);
    *reinterpret_cast<uint32_t*>(&tile[(r + 8) * kPitch + c]) =
        pack2<T>(v[k].z * scale, v[k].w * scale);
  }
  __syncthreads();
  // dq is a dense (B, Sq, H, D) output: rows 16-byte aligned (D % 8 == 0).
  T* dq = static_cast<T*>(p.dq) + b * p.dq_batch_stride +
          h * p.dq_head_stride;
#pragma unroll
  for (int k = 0; k < kDqTileRows * kChunksPerRow / kThreads; ++k) {
    const int chunk = threadIdx.x + k * kThreads;
    const int r = chunk / kChunksPerRow, c = (chunk % kChunksPerRow) * 8;
    if (m0 + r < p.seqlen_q) {
      *reinterpret_cast<uint4*>(dq + (m0 + r) * p.dq_row_stride + c) =
          *reinterpret_cast<const uint4*>(&tile[r * kPitch + c]);
    }
  }
  if (blockIdx.x == 0) reduce_dalibi_rows(p, s, bh);
}

}  // namespace sm90
}  // namespace jax_flash
