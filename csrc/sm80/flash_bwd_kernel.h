// Main backward kernel (FlashAttention-2 style): one CTA per (key tile, b,
// kv head). K and V of the tile stay in shared memory; the CTA walks the
// query tiles that see the tile, for every query head of its GQA group, and
//   S  = Q K^T           recomputed, P = exp(logits(S) - lse)
//   dP = dO V^T
//   dS = P * (dP - delta), through the softcap derivative
//   dV += P^T dO,  dK += dS^T Q   (registers, summed over the group's heads)
//   dQ += dS K                    (added to a float32 workspace)
// GQA: looping the group's heads inside the CTA keeps dK and dV in registers
// (no workspace, no second reduction kernel, deterministic by construction),
// at the price of B * Hkv * Sk / kBlockN CTAs instead of B * H * Sk / kBlockN.
// With alibi, each query row also collects the sums dalibi is made of
// (flash_bwd_convert.h), added next to dQ and in the same order.
// dQ is added with float32 atomics per element or, on sm90 where the tile
// fits in shared memory (and not in deterministic mode), staged in shared
// memory and added by the bulk-copy engine, one row per thread, while the
// next step runs. Deterministic mode orders the dQ additions
// (common/dq_order.h): the key tiles that see query tile m add to it one
// after another, highest first, passing a semaphore per (b, h, m), so every
// float sum runs in the same order.
#pragma once

#include <cmath>
#include <type_traits>

#include "common/bulk_copy.h"
#include "common/dq_order.h"
#include "common/flash.h"
#include "common/mask.h"
#include "common/tile_copy.h"
#include "common/utils.h"
#include "sm80/flash_bwd_preprocess.h"
#include "sm80/flash_bwd_tile_size.h"
#include "sm80/tile_size.h"
#include "sm80/warp_mma.h"

namespace jax_flash {

// kQStages: Q/dO buffers. 2: the next query tile loads while this one is
// multiplied; 1 (GPUs with less shared memory per block, e.g. A100 at head
// dims 64 and >= 128): it loads after this tile's last product, during its
// dQ atomics.
template <typename T_, int kHeadDim_, int kQStages_>
struct BwdKernelTraits {
  using T = T_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kQStages = kQStages_;
  static_assert(kQStages == 1 || kQStages == 2, "one or two Q/dO stages");
  static constexpr int kBlockM = bwd_block_m(kHeadDim);
  static constexpr int kBlockN = bwd_block_n(kHeadDim);
  static constexpr int kThreads = kBwdThreads;
  static constexpr int kPitch = smem_row_pitch(kHeadDim);   // Q, dO, K, V
  static constexpr int kPitchP = smem_row_pitch(kBlockN);   // P, dS
  // Elements of one tile in shared memory.
  static constexpr int kTileQ = kBlockM * kPitch;
  static constexpr int kTileK = kBlockN * kPitch;
  static constexpr int kTileP = kBlockM * kPitchP;
  // K, V; Q and dO per stage; P, dS; then lse and delta per stage
  // (kQStages x 2 x kBlockM floats), the key tile's segment ids (kBlockN
  // ints) and the dalibi row sums of the 4 warp columns (4 x kBlockM float4).
  static constexpr int kSmemBytes =
      (2 * kTileK + 2 * kQStages * kTileQ + 2 * kTileP) * sizeof(T) +
      (2 * kQStages * kBlockM + kBlockN + 16 * kBlockM) * 4;
  static_assert(kSmemBytes <= kSm90SmemPerBlock, "over the sm90 limit per CTA");
  // sm90: dQ of a step staged in shared memory, kBlockM rows of D floats
  // (padded by 8 floats so that the fragment writes hit distinct banks),
  // where it fits beside two Q/dO stages.
  static constexpr int kDqPitch = kHeadDim + 8;
  static constexpr int kSmemBytesStagedDq = kSmemBytes + kBlockM * kDqPitch * 4;
  static constexpr bool kCanStageDq =
      kQStages == 2 && kSmemBytesStagedDq <= kSm90SmemPerBlock;

  // Warp tiling (8 warps). S and dP (kBlockM x kBlockN): 2 x 4 warps.
  static constexpr int kSM16 = kBlockM / 2 / 16;
  static constexpr int kSN8 = kBlockN / 4 / 8;
  // dK and dV (kBlockN x D): 4 x 2 warps.
  static constexpr int kKvM16 = kBlockN / 4 / 16;
  static constexpr int kKvN8 = kHeadDim / 2 / 8;
  // dQ (kBlockM x D): 4 x 2 warps.
  static constexpr int kQM16 = kBlockM / 4 / 16;
  static constexpr int kQN8 = kHeadDim / 2 / 8;
};

// Deterministic mode: wait until `*sem == expected`; all threads return
// after thread 0 saw it.
__device__ __forceinline__ void semaphore_wait(const int* sem, int expected) {
  if (threadIdx.x == 0) {
    int seen;
    do {
      asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n"
                   : "=r"(seen) : "l"(sem) : "memory");
    } while (seen != expected);
  }
  __syncthreads();
}

// Publishes this CTA's earlier global writes, then sets `*sem = value`.
__device__ __forceinline__ void semaphore_signal(int* sem, int value) {
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    asm volatile("st.release.gpu.global.b32 [%0], %1;\n"
                 :: "l"(sem), "r"(value) : "memory");
  }
}

// dq_order_ready_value (common/dq_order.h) out of line, with a mask of its
// own: inlined, its loop kept the mask's fields live across the main loop
// and made the kernel spill.
static __device__ __noinline__ int dq_ready_value(const BwdParams& p, int b,
                                                  int n_block,
                                                  int num_n_blocks,
                                                  int block_n, int block_m,
                                                  int m) {
  return dq_order_ready_value(AttentionMask::make(p, b), n_block,
                              num_n_blocks, block_n, block_m, m);
}

// 4-byte global -> shared copy; zero-fills when !valid.
__device__ __forceinline__ void cp_async_4(void* dst, const void* src,
                                           bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n"
               :: "r"(smem_addr(dst)), "l"(src), "r"(valid ? 4 : 0));
}

// How much of a tile's masking the per-element loop has to apply.
constexpr int kNoMask = 0, kRangeMask = 1, kSegmentMask = 2;

// kScoreMod: softcap or alibi is on (the launch picks); without it the
// scale folds into exp2 and no per-element position arithmetic is left.
// kTilesSlowest: the grid order (launch_bwd_main).
template <typename Traits, bool kScoreMod, bool kTilesSlowest>
__global__ void __launch_bounds__(kBwdThreads, 1)
flash_bwd_kernel(const __grid_constant__ BwdParams p, BwdScratch s) {
  using T = typename Traits::T;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN;
  constexpr int kPitch = Traits::kPitch, kPitchP = Traits::kPitchP;
  constexpr int kSM16 = Traits::kSM16, kSN8 = Traits::kSN8;

  extern __shared__ __align__(16) char smem[];
  T* sK = reinterpret_cast<T*>(smem);
  T* sV = sK + Traits::kTileK;
  constexpr int kQStages = Traits::kQStages;
  T* sQ = sV + Traits::kTileK;                // per stage
  T* sdO = sQ + kQStages * Traits::kTileQ;    // per stage
  T* sP = sdO + kQStages * Traits::kTileQ;
  T* sdS = sP + Traits::kTileP;
  float* s_lse = reinterpret_cast<float*>(sdS + Traits::kTileP);  // per stage
  float* s_delta = s_lse + kQStages * kBlockM;                    // per stage
  int* s_kv_seg = reinterpret_cast<int*>(s_delta + kQStages * kBlockM);
  // Per warp column, per query row: (sum P dP |d|, sum P |d|, sum P dP).
  float4* s_alibi = reinterpret_cast<float4*>(s_kv_seg + kBlockN);
  // Staged dQ (kBlockM x kDqPitch floats), when s.dq_staged.
  float* s_dq = reinterpret_cast<float*>(s_alibi + 4 * kBlockM);
  const bool staged_dq = kHasBulkCopy && Traits::kCanStageDq && s.dq_staged;
  // Staged dQ: the workspace row this thread adds the staged row
  // threadIdx.x (< kBlockM) of the previous step to; nullptr for none.
  float* dq_pending = nullptr;
  auto add_pending_dq = [&] {
    if (dq_pending != nullptr) {
      bulk_add_f32(dq_pending, smem_addr(s_dq + threadIdx.x * Traits::kDqPitch),
                   kHeadDim * 4);
      bulk_commit();
    }
  };

  // Grid (key tiles, B, Hkv), or with kTilesSlowest (B, Hkv, key tiles):
  // see launch_bwd_main; key tiles in reverse in deterministic mode
  // (dq_order.h). b and h_kv are read straight from blockIdx, so that they
  // cost no registers.
  const int num_n_blocks = kTilesSlowest ? gridDim.z : gridDim.x;
  const int n_block = dq_order_key_tile(
      kTilesSlowest ? blockIdx.z : blockIdx.x, num_n_blocks, p.deterministic);
  const int b = kTilesSlowest ? blockIdx.x : blockIdx.y;
  const int h_kv = kTilesSlowest ? blockIdx.y : blockIdx.z;
  const int group = p.num_heads / p.num_heads_kv;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int quad_row = lane / 4, quad_col = 2 * (lane % 4);
  const int n0 = n_block * kBlockN;
  const int num_m_blocks = ceil_div(p.seqlen_q, kBlockM);
  const AttentionMask mask = AttentionMask::make(p, b);

  // Query tiles [m_begin, m_end) see some key of this tile.
  int m_begin, m_end;
  mask.query_tiles(n0, n0 + kBlockN, kBlockM, &m_begin, &m_end);
  const int steps_per_head = m_end - m_begin;
  const int num_steps = group * steps_per_head;

  const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride;
  const T* dout = static_cast<const T*>(p.dout) + b * p.dout_batch_stride;
  const T* k = static_cast<const T*>(p.k) + b * p.k_batch_stride +
               n0 * p.k_row_stride + h_kv * p.k_head_stride;
  const T* v = static_cast<const T*>(p.v) + b * p.v_batch_stride +
               n0 * p.v_row_stride + h_kv * p.v_head_stride;
  // Rows [0, valid) of a tile into shared memory, zeros past them.
  auto load_rows = [&](auto rows, T* dst, const T* src, int64_t row_stride,
                       int valid) {
    copy_rows_async<T, decltype(rows)::value, kHeadDim, kPitch, kBwdThreads>(
        smem_addr(dst), src, row_stride, valid, threadIdx.x);
  };
  using TileN = std::integral_constant<int, kBlockN>;
  using TileM = std::integral_constant<int, kBlockM>;
  load_rows(TileN{}, sK, k, p.k_row_stride, p.seqlen_k - n0);
  load_rows(TileN{}, sV, v, p.v_row_stride, p.seqlen_k - n0);
  // Steps walk the group's query heads in turn, each over query tiles
  // [m_begin, m_end): (h, m0) of the next step, without a division.
  const int m0_first = m_begin * kBlockM, m0_end = m_end * kBlockM;
  auto advance = [&](int& h, int& m0) {
    m0 += kBlockM;
    if (m0 >= m0_end) {
      m0 = m0_first;
      ++h;
    }
  };
  // Q, dO, lse and delta of query head h, tile m0, into buffer `stage`.
  auto load_step = [&](int h, int m0, int stage) {
    load_rows(TileM{}, sQ + stage * Traits::kTileQ,
              q + m0 * p.q_row_stride + h * p.q_head_stride, p.q_row_stride,
              p.seqlen_q - m0);
    load_rows(TileM{}, sdO + stage * Traits::kTileQ,
              dout + m0 * p.dout_row_stride + h * p.dout_head_stride,
              p.dout_row_stride, p.seqlen_q - m0);
    const int t = threadIdx.x;
    if (t < 2 * kBlockM) {
      const int r = t % kBlockM, i = m0 + r;
      const int64_t row = (static_cast<int64_t>(b) * p.num_heads + h) *
                          p.seqlen_q + i;
      const bool in = i < p.seqlen_q;
      if (t < kBlockM) {
        cp_async_4(s_lse + stage * kBlockM + r, in ? p.lse + row : p.lse, in);
      } else {
        cp_async_4(s_delta + stage * kBlockM + r,
                   in ? s.delta + row : s.delta, in);
      }
    }
  };
  int h = h_kv * group, m0 = m0_first;  // this step's
  if (num_steps > 0) load_step(h, m0, 0);
  cp_async_commit();
  if (threadIdx.x < kBlockN) {
    const int j = n0 + threadIdx.x;
    s_kv_seg[threadIdx.x] = mask.has_segments() && j < p.seqlen_k
        ? mask.kv_segment_ids[j] : 0;
  }

  // Warp origins: S/dP rows and columns, dK/dV rows and columns, dQ rows
  // and columns.
  const int s_row0 = (warp / 4) * (kBlockM / 2);
  const int s_col0 = (warp % 4) * (kBlockN / 4);
  const int kv_row0 = (warp / 2) * (kBlockN / 4);
  const int kv_col0 = (warp % 2) * (kHeadDim / 2);
  const int dq_row0 = (warp / 2) * (kBlockM / 4);
  const int dq_col0 = (warp % 2) * (kHeadDim / 2);

  float acc_dk[Traits::kKvM16][Traits::kKvN8][4];
  float acc_dv[Traits::kKvM16][Traits::kKvN8][4];
  zero(acc_dk);
  zero(acc_dv);
  ScoreMod score_mod = ScoreMod::make(p, b, h, mask);
  const bool want_dalibi = kScoreMod && p.dalibi != nullptr;

  for (int step = 0; step < num_steps; ++step) {
    const int stage = kQStages == 2 ? step % 2 : 0;
    const int64_t bh = static_cast<int64_t>(b) * p.num_heads + h;
    cp_async_wait<0>();
    __syncthreads();
    if (staged_dq) add_pending_dq();  // the previous step's, now complete
    if constexpr (kQStages == 2) {
      if (step + 1 < num_steps) {
        int next_h = h, next_m0 = m0;
        advance(next_h, next_m0);
        load_step(next_h, next_m0, stage ^ 1);
      }
      cp_async_commit();
    }
    const bool tile_masked =
        mask.tile_needs_mask(m0, m0 + kBlockM, n0, n0 + kBlockN);
    // fn(kind) with the mask kind this tile needs, a compile-time constant.
    auto with_mask = [&](auto fn) {
      if (!tile_masked) {
        fn(std::integral_constant<int, kNoMask>{});
      } else if (mask.has_segments()) {
        fn(std::integral_constant<int, kSegmentMask>{});
      } else {
        fn(std::integral_constant<int, kRangeMask>{});
      }
    };
    const T* sQ_cur = sQ + stage * Traits::kTileQ;
    const T* sdO_cur = sdO + stage * Traits::kTileQ;

    float acc_s[kSM16][kSN8][4];
    float acc_dp[kSM16][kSN8][4];
    zero(acc_s);
    // S = Q K^T
    warp_mma<kSM16, kSN8, kHeadDim, false, false>(
        acc_s, sQ_cur + s_row0 * kPitch, kPitch, sK + s_col0 * kPitch, kPitch);
    // dP = dO V^T
    auto dp_product = [&] {
      zero(acc_dp);
      warp_mma<kSM16, kSN8, kHeadDim, false, false>(
          acc_dp, sdO_cur + s_row0 * kPitch, kPitch, sV + s_col0 * kPitch,
          kPitch);
    };
    // A (kSM16*16 x kSN8*8) float tile of this warp to shared memory as T.
    auto store_tile = [&](const float (&acc)[kSM16][kSN8][4], T* dst) {
#pragma unroll
      for (int mi = 0; mi < kSM16; ++mi) {
#pragma unroll
        for (int nj = 0; nj < kSN8; ++nj) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int at = (s_row0 + mi * 16 + quad_row + 8 * e) * kPitchP +
                           s_col0 + nj * 8 + quad_col;
            *reinterpret_cast<uint32_t*>(dst + at) =
                pack2<T>(acc[mi][nj][2 * e], acc[mi][nj][2 * e + 1]);
          }
        }
      }
    };

    // P = exp(logit - lse) in place of S; with kWithGrads (dP computed
    // already) also dS = P * (dP - delta) * d(softcap) in place of dP.
    // kMask: kNoMask (every element visible), kRangeMask (each row sees a
    // range of keys) or kSegmentMask (and only keys of its segment).
    score_mod.alibi = Alibi::make(p, b, h, mask);  // of this step's head
    float alibi_rows[kSM16][2][3] = {};
    auto probs = [&](auto masked, auto with_grads) {
      constexpr int kMask = decltype(masked)::value;
      constexpr bool kWithGrads = decltype(with_grads)::value;
#pragma unroll
      for (int mi = 0; mi < kSM16; ++mi) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int r = s_row0 + mi * 16 + quad_row + 8 * e, i = m0 + r;
          // lse in the log2 domain; +inf for a row that sees no key (or
          // past Sq), so that P = 0 there.
          const float lse = s_lse[stage * kBlockM + r];
          const float lse2 = i < p.seqlen_q && lse != -INFINITY
              ? lse * kLog2e : INFINITY;
          [[maybe_unused]] const float delta = s_delta[stage * kBlockM + r];
          [[maybe_unused]] MaskRow row = {};
          if constexpr (kMask != kNoMask) row = mask.row(i);
#pragma unroll
          for (int nj = 0; nj < kSN8; ++nj) {
#pragma unroll
            for (int c = 0; c < 2; ++c) {
              float& sv = acc_s[mi][nj][2 * e + c];
              const int jt = s_col0 + nj * 8 + quad_col + c, j = n0 + jt;
              float prob;
              [[maybe_unused]] float capped = 0.f;
              if constexpr (kScoreMod) {
                const float logit = score_mod(sv, i, j, &capped);
                prob = exp2_approx(logit * kLog2e - lse2);
              } else {
                prob = exp2_approx(sv * p.softmax_scale_log2 - lse2);
              }
              if constexpr (kMask != kNoMask) {
                const bool visible = kMask == kSegmentMask
                    ? row.sees(j, s_kv_seg[jt]) : row.sees(j);
                prob = visible ? prob : 0.f;
              }
              sv = prob;
              if constexpr (kWithGrads) {
                float& dpv = acc_dp[mi][nj][2 * e + c];
                float ds = prob * (dpv - delta);
                if constexpr (kScoreMod) {
                  if (want_dalibi) {
                    // d logit / d slope = -|d|; summed per row with the
                    // row's own delta by the dalibi reduction.
                    const float dist = -score_mod.alibi.grad_slope(i, j);
                    const float pdp = prob * dpv;
                    alibi_rows[mi][e][0] += pdp * dist;
                    alibi_rows[mi][e][1] += prob * dist;
                    alibi_rows[mi][e][2] += pdp;
                  }
                  if (score_mod.softcap.enabled()) {
                    ds *= score_mod.softcap.grad_from_output(capped);
                  }
                }
                dpv = ds;
              }
            }
          }
        }
      }
    };
    // dS = P * (dP - delta) in place of dP, P in acc_s (0 where masked).
    auto grads_from_probs = [&] {
#pragma unroll
      for (int mi = 0; mi < kSM16; ++mi) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int r = s_row0 + mi * 16 + quad_row + 8 * e;
          const float delta = s_delta[stage * kBlockM + r];
#pragma unroll
          for (int nj = 0; nj < kSN8; ++nj) {
#pragma unroll
            for (int c = 0; c < 2; ++c) {
              float& dpv = acc_dp[mi][nj][2 * e + c];
              dpv = acc_s[mi][nj][2 * e + c] * (dpv - delta);
            }
          }
        }
      }
    };

    if constexpr (kScoreMod) {
      // Softcap's derivative needs each capped logit, alibi's gradient P and
      // dP side by side: both products first, then one pass.
      dp_product();
      with_mask([&](auto masked) { probs(masked, std::true_type{}); });
      if (want_dalibi) {
        // Row sums of this warp's columns, to shared memory per warp column.
#pragma unroll
        for (int mi = 0; mi < kSM16; ++mi) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            float sums[3];
#pragma unroll
            for (int x = 0; x < 3; ++x) {
              sums[x] = quad_sum(alibi_rows[mi][e][x]);
            }
            if (lane % 4 == 0) {
              s_alibi[(warp % 4) * kBlockM + s_row0 + mi * 16 + quad_row +
                      8 * e] = make_float4(sums[0], sums[1], sums[2], 0.f);
            }
          }
        }
      }
      store_tile(acc_s, sP);
      store_tile(acc_dp, sdS);
    } else {
      // P first, then dP = dO V^T: the exponentials (special-function unit)
      // can issue while the tensor cores run the second product; each mask
      // case gets its own copy so that the compiler may interleave them.
      auto plain = [&](auto masked) {
        probs(masked, std::false_type{});
        store_tile(acc_s, sP);
        dp_product();
        grads_from_probs();
        store_tile(acc_dp, sdS);
      };
      with_mask(plain);
    }
    // The staged dQ rows are read before any warp writes them again.
    if (staged_dq) bulk_wait_sources_read();
    __syncthreads();

    // dV += P^T dO
    warp_mma<Traits::kKvM16, Traits::kKvN8, kBlockM, true, true>(
        acc_dv, sP + kv_row0, kPitchP, sdO_cur + kv_col0, kPitch);
    // dK += dS^T Q
    warp_mma<Traits::kKvM16, Traits::kKvN8, kBlockM, true, true>(
        acc_dk, sdS + kv_row0, kPitchP, sQ_cur + kv_col0, kPitch);
    // dQ += dS K
    float acc_dq[Traits::kQM16][Traits::kQN8][4];
    zero(acc_dq);
    warp_mma<Traits::kQM16, Traits::kQN8, kBlockN, false, true>(
        acc_dq, sdS + dq_row0 * kPitchP, kPitchP, sK + dq_col0, kPitch);
    if constexpr (kQStages == 1) {
      __syncthreads();  // every warp is done with this Q, dO, lse, delta
      if (step + 1 < num_steps) {
        int next_h = h, next_m0 = m0;
        advance(next_h, next_m0);
        load_step(next_h, next_m0, 0);
      }
      cp_async_commit();
    }
    int* sem = p.deterministic
        ? s.dq_semaphore + bh * num_m_blocks + m0 / kBlockM : nullptr;
    if (p.deterministic) {
      semaphore_wait(sem, dq_ready_value(p, b, n_block, num_n_blocks,
                                         kBlockN, kBlockM, m0 / kBlockM));
    }
    if (staged_dq) {
      // To shared memory; added at the next step's first barrier.
#pragma unroll
      for (int mi = 0; mi < Traits::kQM16; ++mi) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
#pragma unroll
          for (int nj = 0; nj < Traits::kQN8; ++nj) {
            const int r = dq_row0 + mi * 16 + quad_row + 8 * e;
            *reinterpret_cast<float2*>(
                s_dq + r * Traits::kDqPitch + dq_col0 + nj * 8 + quad_col) =
                make_float2(acc_dq[mi][nj][2 * e], acc_dq[mi][nj][2 * e + 1]);
          }
        }
      }
      fence_shared_for_bulk_copy();
      const int i = m0 + static_cast<int>(threadIdx.x);
      dq_pending = threadIdx.x < kBlockM && i < p.seqlen_q
          ? s.dq_accum + (bh * p.seqlen_q + i) * kHeadDim : nullptr;
    } else {
      // Every address of this thread is `dq_row` plus a constant.
      const int dq_i0 = m0 + dq_row0 + quad_row;
      float* dq_row = s.dq_accum + (bh * p.seqlen_q + dq_i0) * kHeadDim +
                      dq_col0 + quad_col;
#pragma unroll
      for (int mi = 0; mi < Traits::kQM16; ++mi) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          if (dq_i0 + mi * 16 + 8 * e >= p.seqlen_q) continue;
#pragma unroll
          for (int nj = 0; nj < Traits::kQN8; ++nj) {
            float* dst = dq_row + (mi * 16 + 8 * e) * kHeadDim + nj * 8;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
            atomicAdd(reinterpret_cast<float2*>(dst),
                      make_float2(acc_dq[mi][nj][2 * e],
                                  acc_dq[mi][nj][2 * e + 1]));
#else
            atomicAdd(dst, acc_dq[mi][nj][2 * e]);
            atomicAdd(dst + 1, acc_dq[mi][nj][2 * e + 1]);
#endif
          }
        }
      }
    }
    if (want_dalibi && threadIdx.x < kBlockM &&
        m0 + threadIdx.x < p.seqlen_q) {
      // The 4 warp columns in a fixed order, then one add per row.
      float4 sum = s_alibi[threadIdx.x];
#pragma unroll
      for (int w = 1; w < 4; ++w) {
        const float4 part = s_alibi[w * kBlockM + threadIdx.x];
        sum.x += part.x;
        sum.y += part.y;
        sum.z += part.z;
      }
      float* dst = &s.dalibi_rows[bh * p.seqlen_q + m0 + threadIdx.x].x;
      atomicAdd(dst, sum.x);
      atomicAdd(dst + 1, sum.y);
      atomicAdd(dst + 2, sum.z);
    }
    if (p.deterministic) semaphore_signal(sem, n_block + 1);
    advance(h, m0);
  }
  if (staged_dq) {
    __syncthreads();
    add_pending_dq();  // the last step's
    bulk_wait_all();
  }

  // dK = softmax_scale * dS^T Q (the scale of the logits), dV as summed.
  T* dk = static_cast<T*>(p.dk) + b * p.dk_batch_stride +
          h_kv * p.dk_head_stride;
  T* dv = static_cast<T*>(p.dv) + b * p.dv_batch_stride +
          h_kv * p.dv_head_stride;
#pragma unroll
  for (int mi = 0; mi < Traits::kKvM16; ++mi) {
#pragma unroll
    for (int nj = 0; nj < Traits::kKvN8; ++nj) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int j = n0 + kv_row0 + mi * 16 + quad_row + 8 * e;
        const int col = kv_col0 + nj * 8 + quad_col;
        if (j >= p.seqlen_k) continue;
        *reinterpret_cast<uint32_t*>(dk + j * p.dk_row_stride + col) =
            pack2<T>(acc_dk[mi][nj][2 * e] * p.softmax_scale,
                     acc_dk[mi][nj][2 * e + 1] * p.softmax_scale);
        *reinterpret_cast<uint32_t*>(dv + j * p.dv_row_stride + col) =
            pack2<T>(acc_dv[mi][nj][2 * e], acc_dv[mi][nj][2 * e + 1]);
      }
    }
  }
}

}  // namespace jax_flash
