// FlashAttention-2-style forward kernel for sm80 and later (mma.sync).
//
// One CTA per (query tile, head, batch). Its warps split the query rows; K
// and V tiles stream through shared memory with cp.async, two stages deep
// (one, where shared memory is short: K[n-1] then loads during P V[n] and
// V[n-1] during the next Q K^T), and the kernel walks them from the last
// visible key tile down, so that the tiles that need masking (the diagonal,
// the ragged end) come first and the rest run unmasked. Scores and the
// output stay in registers:
//   S = Q K^T (mma.sync m16n8k16), online softmax in base 2 with the scale
//   folded into one fma, O += P V, and O / rowsum at the end.
#pragma once

#include <cmath>
#include <type_traits>

#include "common/flash.h"
#include "common/mask.h"
#include "common/tile_copy.h"
#include "common/utils.h"
#include "sm80/softmax.h"
#include "sm80/tile_size.h"
#include "sm80/warp_mma.h"

namespace jax_flash {

template <typename T_, int kHeadDim_, int kBlockM_, int kBlockN_,
          int kNWarps_, int kStages_>
struct FwdKernelTraits {
  using T = T_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kNThreads = kNWarps * 32;
  static constexpr int kWarpRows = kBlockM / kNWarps;
  static constexpr int kRowBlocks = kWarpRows / 16;  // m16 blocks per warp
  static constexpr int kNTiles = kBlockN / 8;    // n8 tiles of S
  static constexpr int kDTiles = kHeadDim / 8;   // n8 tiles of O
  static constexpr int kPitch = smem_row_pitch(kHeadDim);  // elements
  static constexpr int kStages = kStages_;  // K and V buffers: 1 or 2 each
  static_assert(kStages == 1 || kStages == 2, "one or two K/V stages");
  static constexpr int kChunksPerRow = kHeadDim / 8;  // 16-byte chunks
  // Shared memory: Q (kBlockM rows), then kStages K tiles, kStages V tiles.
  static constexpr int kQElems = kBlockM * kPitch;
  static constexpr int kKVElems = kBlockN * kPitch;
  static constexpr int kSmemBytes =
      (kQElems + 2 * kStages * kKVElems) * static_cast<int>(sizeof(T));

  static_assert(kHeadDim % 16 == 0 && kBlockN % 16 == 0, "tile shape");
  static_assert(kWarpRows % 16 == 0, "each warp owns whole m16 blocks");
  static_assert((kBlockM * kChunksPerRow) % kNThreads == 0 &&
                (kBlockN * kChunksPerRow) % kNThreads == 0,
                "tile loads split evenly over the threads");
};

// Copies a (kTileRows x D) tile into shared memory (tile_copy.h).
// kFull: the caller knows valid_rows >= kTileRows (no predicates).
template <typename Traits, int kTileRows, bool kFull = false>
__device__ __forceinline__ void load_tile(uint32_t smem, const typename
                                          Traits::T* gmem, int64_t stride,
                                          int valid_rows, int tid) {
  copy_rows_async<typename Traits::T, kTileRows, Traits::kHeadDim,
                  Traits::kPitch, Traits::kNThreads, kFull>(
      smem, gmem, stride, valid_rows, tid);
}

// Output row m0 of (batch b, head h), and its lse entry.
__device__ __forceinline__ void* out_tile(const FwdParams& p, int b, int h,
                                          int m0, int elem_bytes) {
  return static_cast<char*>(p.out) +
         (b * p.out_batch_stride + h * p.out_head_stride +
          static_cast<int64_t>(m0) * p.out_row_stride) * elem_bytes;
}
__device__ __forceinline__ float* lse_tile(const FwdParams& p, int b, int h,
                                           int m0) {
  return p.lse + (static_cast<int64_t>(b) * p.num_heads + h) * p.seqlen_q + m0;
}

template <typename Traits, bool kScoreMod>
__global__ void __launch_bounds__(Traits::kNThreads,
                                  fwd_min_ctas_per_sm(Traits::kHeadDim))
flash_fwd_kernel(const __grid_constant__ FwdParams p) {
  using T = typename Traits::T;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kRowBlocks = Traits::kRowBlocks;
  constexpr int kNTiles = Traits::kNTiles;
  constexpr int kDTiles = Traits::kDTiles;
  constexpr int kPitch = Traits::kPitch;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* q_smem = reinterpret_cast<T*>(smem_raw);
  const uint32_t q_base = smem_addr(q_smem);
  const uint32_t k_base = q_base + Traits::kQElems * sizeof(T);
  const uint32_t v_base =
      k_base + Traits::kStages * Traits::kKVElems * sizeof(T);
  const T* k_smem = q_smem + Traits::kQElems;
  const T* v_smem = k_smem + Traits::kStages * Traits::kKVElems;
  constexpr uint32_t kStageBytes = Traits::kKVElems * sizeof(T);

  // Longest query tiles first: under a causal mask the last tiles have the
  // most keys, and starting them first evens out the tail of the grid.
  const int m_block = gridDim.x - 1 - blockIdx.x;
  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const int m0 = m_block * kBlockM;
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int g = lane / 4;  // accumulator row within an m16 block (and +8)
  const int t = lane % 4;  // accumulator column pair within an n8 tile
  const int warp_row0 = warp * Traits::kWarpRows;

  const AttentionMask mask = AttentionMask::make(p, b);
  const int kv_h = h / (p.num_heads / p.num_heads_kv);
  const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride +
               h * p.q_head_stride + static_cast<int64_t>(m0) * p.q_row_stride;
  const T* k = static_cast<const T*>(p.k) + b * p.k_batch_stride +
               kv_h * p.k_head_stride;
  const T* v = static_cast<const T*>(p.v) + b * p.v_batch_stride +
               kv_h * p.v_head_stride;
  const int rows_here = min(kBlockM, p.seqlen_q - m0);

  const int key_lo = mask.key_begin(m0);
  const int key_hi = mask.key_end(m0 + kBlockM);
  if (key_lo >= key_hi) {
    // No query of this tile sees any key: out 0, lse -inf.
    T* out = static_cast<T*>(out_tile(p, b, h, m0, sizeof(T)));
    float* lse_out = lse_tile(p, b, h, m0);
    for (int c = tid; c < kBlockM * Traits::kChunksPerRow;
         c += Traits::kNThreads) {
      const int row = c / Traits::kChunksPerRow;
      const int col = (c % Traits::kChunksPerRow) * 8;
      if (row < rows_here) {
        *reinterpret_cast<uint4*>(out + row * p.out_row_stride + col) =
            make_uint4(0, 0, 0, 0);
      }
    }
    for (int row = tid; row < rows_here; row += Traits::kNThreads) {
      lse_out[row] = -INFINITY;
    }
    return;
  }
  const int n_lo = key_lo / kBlockN;
  const int n_hi = (key_hi - 1) / kBlockN;

  auto kv_rows = [&](int n) { return min(kBlockN, p.seqlen_k - n * kBlockN); };

  load_tile<Traits, kBlockM>(q_base, q, p.q_row_stride, rows_here, tid);
  load_tile<Traits, kBlockN>(k_base, k + n_hi * kBlockN * p.k_row_stride,
                             p.k_row_stride, kv_rows(n_hi), tid);
  cp_async_commit();
  load_tile<Traits, kBlockN>(v_base, v + n_hi * kBlockN * p.v_row_stride,
                             p.v_row_stride, kv_rows(n_hi), tid);
  cp_async_commit();

  float acc[kRowBlocks][kDTiles][4];
  zero(acc);
  OnlineSoftmax<kRowBlocks> softmax;
  softmax.init();

  const ScoreMod score_mod = ScoreMod::make(p, b, h, mask);
  // With score modifiers the scores are natural-log logits already scaled.
  const float scale_log2 = kScoreMod ? kLog2e : p.softmax_scale_log2;
  const int row_base = m0 + warp_row0 + g;  // + 16 * mb + 8 * r

  int stage = 0;
  // One mainloop step over key tile n. kMasked: apply the mask per element
  // (a tile on a mask boundary); otherwise every score counts.
  auto step = [&](int n, auto masked) {
    constexpr bool kMasked = decltype(masked)::value;
    const int n0 = n * kBlockN;
    const T* k_tile = k_smem + stage * Traits::kKVElems;
    const T* v_tile = v_smem + stage * Traits::kKVElems;

    cp_async_wait<1>();  // K[n] has landed (V[n] may still be in flight)
    __syncthreads();
    // Only the first tile (n_hi) can end past Sk: the ones prefetched here
    // lie below it and are full.
    if constexpr (Traits::kStages == 2) {
      if (n > n_lo) {
        load_tile<Traits, kBlockN, true>(
            k_base + (stage ^ 1) * kStageBytes,
            k + (n - 1) * kBlockN * p.k_row_stride, p.k_row_stride,
            kv_rows(n - 1), tid);
      }
      cp_async_commit();
    }

    // S = Q K^T
    float s[kRowBlocks][kNTiles][4];
    zero(s);
    warp_mma<kRowBlocks, kNTiles, Traits::kHeadDim, false, false>(
        s, q_smem + warp_row0 * kPitch, kPitch, k_tile, kPitch);

    // Score modifiers, then the mask on tiles that cross a mask boundary.
    if (kScoreMod) {
#pragma unroll
      for (int mb = 0; mb < kRowBlocks; ++mb) {
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int i = row_base + 16 * mb + 8 * (e / 2);
            const int j = n0 + nt * 8 + 2 * t + e % 2;
            s[mb][nt][e] = score_mod(s[mb][nt][e], i, j);
          }
        }
      }
    }
    if (kMasked) {
#pragma unroll
      for (int mb = 0; mb < kRowBlocks; ++mb) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          // Columns of this lane are n0 + 8 nt + 2t + e: the row's keys
          // counted from n0 + 2t, so that each test has a constant offset.
          const MaskRow row =
              mask.row(row_base + 16 * mb + 8 * r).from(n0 + 2 * t);
#pragma unroll
          for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              if (!row.sees(nt * 8 + e)) s[mb][nt][2 * r + e] = -INFINITY;
            }
          }
        }
      }
      if (mask.has_segments()) {
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int j = min(n0 + nt * 8 + 2 * t + e, p.seqlen_k - 1);
            const int kv_seg = mask.kv_segment_ids[j];
#pragma unroll
            for (int mb = 0; mb < kRowBlocks; ++mb) {
#pragma unroll
              for (int r = 0; r < 2; ++r) {
                const int i = min(row_base + 16 * mb + 8 * r, p.seqlen_q - 1);
                if (!MaskRow::same_segment(mask.q_segment_ids[i], kv_seg)) {
                  s[mb][nt][2 * r + e] = -INFINITY;
                }
              }
            }
          }
        }
      }
    }

    softmax.update(s, acc, scale_log2);

    if constexpr (Traits::kStages == 2) {
      cp_async_wait<1>();  // V[n] has landed (K[n-1] may still be in flight)
      __syncthreads();
      if (n > n_lo) {
        load_tile<Traits, kBlockN, true>(
            v_base + (stage ^ 1) * kStageBytes,
            v + (n - 1) * kBlockN * p.v_row_stride, p.v_row_stride,
            kv_rows(n - 1), tid);
      }
      cp_async_commit();
    } else {
      cp_async_wait<0>();  // V[n] has landed
      __syncthreads();     // and every warp is done with K[n]
      if (n > n_lo) {
        load_tile<Traits, kBlockN, true>(
            k_base, k + (n - 1) * kBlockN * p.k_row_stride, p.k_row_stride,
            kv_rows(n - 1), tid);
      }
      cp_async_commit();
    }

    // O += P V, P taken from the score registers: the C layout of n8 tiles
    // 2kk and 2kk+1 is the A layout of k16 step kk.
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      uint32_t a[kRowBlocks][4];
      accumulator_as_a<T>(s, kk, a);
      warp_mma_a_in_registers<kRowBlocks, kDTiles, true>(acc, a, v_tile,
                                                         kPitch, kk * 16);
    }
    if constexpr (Traits::kStages == 2) {
      stage ^= 1;
    } else {
      __syncthreads();  // every warp is done with V[n]
      if (n > n_lo) {
        load_tile<Traits, kBlockN, true>(
            v_base, v + (n - 1) * kBlockN * p.v_row_stride, p.v_row_stride,
            kv_rows(n - 1), tid);
      }
      cp_async_commit();
    }
  };

  // Tiles wholly inside the unmasked key range skip the mask. Walking down
  // from n_hi: boundary tiles (the diagonal, the ragged end), the unmasked
  // middle, then boundary tiles of a left window.
  int free_lo, free_hi;
  mask.unmasked_keys(m0, m0 + kBlockM, &free_lo, &free_hi);
  const int full_lo = max(n_lo, ceil_div(free_lo, kBlockN));
  const int full_hi = min(n_hi, free_hi / kBlockN - 1);
  int n = n_hi;
  for (; n >= n_lo && n > full_hi; --n) step(n, std::true_type{});
  for (; n >= full_lo; --n) step(n, std::false_type{});
  for (; n >= n_lo; --n) step(n, std::true_type{});

  // Epilogue: O / rowsum; rows past q_len give 0 and lse -inf.
  float inv_sum[kRowBlocks][2];
  float lse[kRowBlocks][2];
  softmax.finalize(inv_sum, lse, scale_log2);
  cp_async_wait<0>();
  T* out = static_cast<T*>(out_tile(p, b, h, m0, sizeof(T)));
  float* lse_out = lse_tile(p, b, h, m0);
  // This warp's rows of the Q tile are read by no other warp; reuse them to
  // turn the output fragments into 16-byte row stores.
  __syncwarp();
#pragma unroll
  for (int mb = 0; mb < kRowBlocks; ++mb) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = warp_row0 + 16 * mb + 8 * r + g;
      const bool live = m0 + row < mask.q_len;
      const float scale = live ? inv_sum[mb][r] : 0.f;
      if (t == 0 && row < rows_here) {
        lse_out[row] = live ? lse[mb][r] : -INFINITY;
      }
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt) {
        *reinterpret_cast<uint32_t*>(q_smem + row * kPitch + dt * 8 + 2 * t) =
            pack2<T>(acc[mb][dt][2 * r] * scale,
                     acc[mb][dt][2 * r + 1] * scale);
      }
    }
  }
  __syncwarp();
  static_assert((Traits::kWarpRows * Traits::kChunksPerRow) % 32 == 0, "");
#pragma unroll
  for (int it = 0; it < Traits::kWarpRows * Traits::kChunksPerRow / 32; ++it) {
    const int c = lane + 32 * it;
    const int row = warp_row0 + c / Traits::kChunksPerRow;
    const int col = (c % Traits::kChunksPerRow) * 8;
    if (row < rows_here) {
      *reinterpret_cast<uint4*>(out + row * p.out_row_stride + col) =
          *reinterpret_cast<const uint4*>(q_smem + row * kPitch + col);
    }
  }
}

}  // namespace jax_flash
