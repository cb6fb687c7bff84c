// Main backward kernel for sm90 (TMA, wgmma, warp specialization).
//
// One CTA per (key tile of 128 keys, kv head, batch row), walking the query
// tiles of 64 rows that see the keys, for every query head of the GQA group
// (dK and dV summed over them in registers); the walk starts at the first
// such tile, or, in deterministic mode's cyclic order, at one staggered by
// key tile and wraps around (QueryWalk, common/dq_order.h). Three
// warpgroups:
//   producer (warpgroup 0): one thread loads K and V once and, through an
//     mbarrier pipeline of two stages, each step's Q and dO tiles (TMA) and
//     its rows' (lse log2 e, delta) (one bulk copy from the preprocess's
//     row_stats); warp 1 is the dQ writer (below); the warpgroup's registers
//     go to the consumers (setmaxnreg).
//   consumers (warpgroups 1 and 2): 64 keys each. Per step
//     S^T = K Q^T and dP^T = V dO^T      (wgmma, issued together)
//     P^T = exp2(S^T scale - lse)        (registers; masks, score modifiers)
//     dV += P^T dO                       (P^T from registers)
//     dS^T = P^T (dP^T - delta)          (softcap's derivative, dalibi sums)
//     dS^T to shared memory; dQ = dS K   (each warpgroup half of D, over all
//                                         128 keys)
//     dK += dS^T Q                       (dS^T from registers; runs on under
//                                         the dQ staging and the next step's
//                                         first GEMMs)
//     dQ to shared memory (float32, the tile order of bwd_dq_tile.h), each
//     warpgroup's half handed to the dQ writer, which adds it to the
//     workspace with one bulk reduction while the consumers go on to the
//     next step. In deterministic mode the writer first waits for the query
//     tile's semaphore (common/dq_order.h), so the consumers never wait for
//     other CTAs unless the writer falls a whole step behind.
// Split-D (D > 128, bwd_tile_size.h): 64 keys per CTA, one Q/dO stage at
// D = 256 and two at D = 192.
// Each consumer warpgroup computes S^T and dP^T for 32 of the step's 64
// queries, writes P^T and dS^T to shared memory, and after a barrier runs
// dV += P^T dO, dK += dS^T Q and dQ = dS K for its half of D, all three
// reading P^T and dS^T from shared memory; the step's GEMMs complete before
// the next step's P^T and dS^T overwrite them.
// The epilogue stages dK (times the softmax scale) and dV in shared memory
// and writes them as whole rows.
#pragma once

#include <cmath>
#include <type_traits>

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/pipeline/pipeline.hpp>

#include "common/bulk_copy.h"
#include "common/dq_order.h"
#include "common/flash.h"
#include "common/mask.h"
#include "common/utils.h"
#include "sm80/flash_bwd_preprocess.h"
#include "sm90/flash_bwd_kernel_traits.h"
#include "sm90/flash_fwd_kernel.h"  // warpgroup_gemm_issue
#include "sm90/softmax.h"           // accumulator views

namespace jax_flash {
namespace sm90 {

template <typename Traits>
struct BwdKernelParams {
  BwdParams p;
  BwdScratch scratch;
  typename Traits::TmaQ tma_q;
  typename Traits::TmaQ tma_do;
  typename Traits::TmaK tma_k;
  typename Traits::TmaK tma_v;
  // Deterministic mode: the launch found that all key tile CTAs of one
  // (batch row, K/V head) can be resident at once, which lets them run in
  // grid order and the dQ order be cyclic (common/dq_order.h).
  bool dq_tiles_resident;
};

// Named barriers (ids past those TensorCoreTurns uses).
constexpr uint32_t kBarrierDsWritten = 2;  // the 256 consumer threads
// Per consumer warpgroup (+ wg), its 128 threads and the dQ writer warp:
// its dQ half is staged (consumers arrive, the writer waits) and the
// staging half is free again (the writer arrives, the consumers wait).
constexpr uint32_t kBarrierDqFull = 3;
constexpr uint32_t kBarrierDqEmpty = 5;
constexpr uint32_t kDqHandoffThreads = 128 + 32;
constexpr int kDqWriterWarp = 1;  // of the producer warpgroup

// The consumer warpgroup wg's side of a hand-over barrier (base + wg), with
// the id an immediate: wg is warp-uniform.
__device__ __forceinline__ void dq_handoff_sync(int wg, uint32_t base) {
  if (wg == 0) {
    cutlass::arch::NamedBarrier::sync(kDqHandoffThreads, base);
  } else {
    cutlass::arch::NamedBarrier::sync(kDqHandoffThreads, base + 1);
  }
}
__device__ __forceinline__ void dq_handoff_arrive(int wg, uint32_t base) {
  if (wg == 0) {
    cutlass::arch::NamedBarrier::arrive(kDqHandoffThreads, base);
  } else {
    cutlass::arch::NamedBarrier::arrive(kDqHandoffThreads, base + 1);
  }
}

// Deterministic mode, in the dQ writer's lane 0: wait until `*sem ==
// expected`, then order the bulk additions issued next after that read.
__device__ __forceinline__ void dq_semaphore_wait(const int* sem,
                                                  int expected) {
  int seen;
  do {
    asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n"
                 : "=r"(seen) : "l"(sem) : "memory");
  } while (seen != expected);
  asm volatile("fence.proxy.async.global;\n" ::: "memory");
}

// Deterministic mode, in the dQ writer's lane 0 once its bulk additions
// have completed (bulk_wait_all): make them visible, then set `*sem =
// value`.
__device__ __forceinline__ void dq_semaphore_signal(int* sem, int value) {
  asm volatile("fence.proxy.async.global;\n" ::: "memory");
  __threadfence();
  asm volatile("st.release.gpu.global.b32 [%0], %1;\n"
               :: "l"(sem), "r"(value) : "memory");
}

// The (query head, query tile) a key tile's CTA visits at one step. Steps
// walk the group's query heads in turn; per head the query tiles
// [m0_first, m0_end) from m0_start, wrapping from m0_end to m0_first, the
// head done when the walk is back at m0_start (common/dq_order.h: m0_start
// is m0_first except in the cyclic order). Rows, not tile indices.
struct QueryWalk {
  int m0_first, m0_end, m0_start;
  int h, m0;  // this step's

  __device__ __forceinline__ static QueryWalk make(int h, int m0_first,
                                                   int m0_end, int m0_start) {
    return {m0_first, m0_end, m0_start, h, m0_start};
  }
  __device__ __forceinline__ void advance(int block_m) {
    m0 += block_m;
    if (m0 >= m0_end) m0 = m0_first;
    if (m0 == m0_start) ++h;
  }
};

// The dQ writer (one warp of the producer warpgroup): per step, as each
// consumer warpgroup hands over its staged half of the float32 dQ tile, adds
// it to the workspace with one bulk reduction, and hands the half back once
// the bulk engine has read it. In deterministic mode it first waits for the
// query tile's turn (common/dq_order.h), also adds the step's dalibi row
// sums (dalibi_in_order: smem.alibi_rows, staged by consumer warpgroup 0
// with its dQ half) and passes the turn on once its additions have
// completed.
// Its steps follow `walk` from the CTA's first step, as the producer's and
// the consumers' do; in deterministic mode the semaphore values follow the
// walk's order (`cyclic`, common/dq_order.h).
template <typename Traits>
__device__ __forceinline__ void write_dq(
    const BwdParams& p, const BwdScratch& scratch,
    typename Traits::SharedStorage& smem, const AttentionMask& mask, int b,
    int n_block, int num_n_blocks, bool cyclic, QueryWalk walk,
    int num_steps, bool dalibi_in_order) {
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr uint32_t kHalfBytes = kBlockM * (kHeadDim / 2) * 4;
  const int lane = threadIdx.x % 32;
  const int num_m_blocks = ceil_div(p.seqlen_q, kBlockM);
  const int64_t stats_pitch = row_stats_pitch(p.seqlen_q);
  for (int step = 0; step < num_steps; ++step) {
    const int h = walk.h, m0 = walk.m0;
    const int64_t bh = static_cast<int64_t>(b) * p.num_heads + h;
    float* dq_accum_tile = scratch.dq_accum + (bh * stats_pitch + m0) * kHeadDim;
    int* sem = p.deterministic
        ? scratch.dq_semaphore + bh * num_m_blocks + m0 / kBlockM : nullptr;
    auto wait_turn = [&]() __attribute__((always_inline)) {
      if (p.deterministic && lane == 0) {
        const int m = m0 / kBlockM;
        dq_semaphore_wait(
            sem, cyclic ? dq_order_cyclic_ready_value(mask, n_block,
                                                      Traits::kBlockN,
                                                      kBlockM, m)
                        : dq_order_ready_value(mask, n_block, num_n_blocks,
                                               Traits::kBlockN, kBlockM, m));
      }
      __syncwarp();
    };
    auto add_half = [&](int half) __attribute__((always_inline)) {
      if (lane == 0) {
        const int offset = dq_tile_index<kHeadDim>(half, 0, 0);
        bulk_add_f32(dq_accum_tile + offset, smem_addr(smem.dq + offset),
                     kHalfBytes);
        bulk_commit();
      }
    };
    wait_turn();
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      cutlass::arch::NamedBarrier::sync(kDqHandoffThreads,
                                        kBarrierDqFull + half);
      add_half(half);
    }
    const bool hand_back = step + 1 < num_steps;
    if (p.deterministic) {
      if (dalibi_in_order && lane == 0) {
        const int rows_here = min(kBlockM, p.seqlen_q - m0);
        bulk_add_f32(&scratch.dalibi_rows[bh * p.seqlen_q + m0].x,
                     smem_addr(smem.alibi_rows), rows_here * 16);
        bulk_commit();
      }
      __syncwarp();
      if (lane == 0) {
        bulk_wait_all();  // the additions are in global memory
        dq_semaphore_signal(sem, n_block + 1);
      }
      __syncwarp();
      if (hand_back) {
        cutlass::arch::NamedBarrier::arrive(kDqHandoffThreads,
                                            kBarrierDqEmpty);
        cutlass::arch::NamedBarrier::arrive(kDqHandoffThreads,
                                            kBarrierDqEmpty + 1);
      }
    } else {
      // Each half back as soon as the bulk engine has read it.
      if (lane == 0) bulk_wait_sources_read<1>();
      __syncwarp();
      if (hand_back) {
        cutlass::arch::NamedBarrier::arrive(kDqHandoffThreads,
                                            kBarrierDqEmpty);
      }
      if (lane == 0) bulk_wait_sources_read<0>();
      __syncwarp();
      if (hand_back) {
        cutlass::arch::NamedBarrier::arrive(kDqHandoffThreads,
                                            kBarrierDqEmpty + 1);
      }
    }
    walk.advance(kBlockM);
  }
  if (lane == 0) bulk_wait_all();
}

template <typename Traits, bool kScoreMod>
__global__ void __launch_bounds__(Traits::kThreads, 1)
flash_bwd_sm90_kernel(const __grid_constant__ BwdKernelParams<Traits> params) {
  using namespace cute;
  using T = typename Traits::T;
  using Element = typename Traits::Element;
  using SharedStorage = typename Traits::SharedStorage;
  using Pipeline = typename Traits::Pipeline;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;

  extern __shared__ __align__(1024) unsigned char smem_raw[];
  SharedStorage& smem = *reinterpret_cast<SharedStorage*>(smem_raw);
  const BwdParams& p = params.p;
  const BwdScratch& scratch = params.scratch;

  const int num_n_blocks = gridDim.x;
  const int n_block = dq_order_key_tile(
      blockIdx.x, num_n_blocks, p.deterministic && !params.dq_tiles_resident);
  const int h_kv = blockIdx.y;
  const int b = blockIdx.z;
  const int n0 = n_block * kBlockN;
  const int group = p.num_heads / p.num_heads_kv;
  const AttentionMask mask = AttentionMask::make(p, b);

  // Query tiles [m_begin, m_end) see some key of this tile.
  int m_begin, m_end;
  mask.query_tiles(n0, n0 + kBlockN, kBlockM, &m_begin, &m_end);
  const int steps_per_head = m_end - m_begin;
  const int num_steps = group * steps_per_head;
  // Warp-uniform (a shuffle from lane 0): kept in a uniform register, where
  // threadIdx.x / 128 is re-read from the special register at every use
  // under register pressure.
  const int warpgroup = __shfl_sync(0xffffffffu, threadIdx.x / 128, 0);

  typename Pipeline::Params pipeline_params;
  pipeline_params.transaction_bytes = Traits::kStepBytes;
  pipeline_params.role = warpgroup == 0 ? Pipeline::ThreadCategory::Producer
                                        : Pipeline::ThreadCategory::Consumer;
  pipeline_params.is_leader = threadIdx.x == 0;
  pipeline_params.num_consumers = Traits::kConsumerThreads;
  Pipeline pipeline_q(smem.pipeline_q, pipeline_params, Shape<_1, _1, _1>{});
  if (threadIdx.x == 0) smem.kv_full.init(1);
  if (threadIdx.x < kBlockN) {
    const int j = n0 + threadIdx.x;
    smem.kv_segment[threadIdx.x] =
        mask.has_segments() && j < p.seqlen_k ? mask.kv_segment_ids[j] : 0;
  }
  cutlass::arch::fence_barrier_init();
  __syncthreads();

  Tensor sQ = make_tensor(make_smem_ptr(smem.q.data()),
                          typename Traits::SmemLayoutQ{});
  Tensor sdO = make_tensor(make_smem_ptr(smem.dout.data()),
                           typename Traits::SmemLayoutQ{});
  Tensor sQt = make_tensor(make_smem_ptr(smem.q.data()),
                           typename Traits::SmemLayoutQt{});
  Tensor sdOt = make_tensor(make_smem_ptr(smem.dout.data()),
                            typename Traits::SmemLayoutQt{});
  Tensor sK = make_tensor(make_smem_ptr(smem.k.data()),
                          typename Traits::SmemLayoutK{});
  Tensor sV = make_tensor(make_smem_ptr(smem.v.data()),
                          typename Traits::SmemLayoutK{});
  Tensor sKt = make_tensor(make_smem_ptr(smem.k.data()),
                           typename Traits::SmemLayoutKt{});
  Tensor sDs = make_tensor(make_smem_ptr(smem.ds.data()),
                           typename Traits::SmemLayoutDs{});
  Tensor sDsT = make_tensor(make_smem_ptr(smem.ds.data()),
                            typename Traits::SmemLayoutDsT{});

  // Steps walk the group's query heads in turn, each over query tiles
  // [m_begin, m_end) from the one the dQ order starts this key tile at.
  const bool cyclic =
      p.deterministic && dq_order_cyclic(mask, params.dq_tiles_resident);
  const int m_start = dq_order_first_tile(mask, cyclic, n_block, kBlockN,
                                          m_begin, m_end);
  const QueryWalk first_step = QueryWalk::make(
      h_kv * group, m_begin * kBlockM, m_end * kBlockM, m_start * kBlockM);

  if (warpgroup == 0) {
    // ---- producer ----
    cutlass::arch::warpgroup_reg_dealloc<kBwdProducerRegisters>();
    if (__shfl_sync(0xffffffffu, threadIdx.x / 32, 0) == kDqWriterWarp) {
      write_dq<Traits>(p, scratch, smem, mask, b, n_block, num_n_blocks,
                       cyclic, first_step, num_steps,
                       kScoreMod && p.dalibi != nullptr && p.deterministic);
      return;
    }
    if (threadIdx.x != 0) return;
    auto shape = [&](int s, int heads) {
      return make_shape(s, p.head_dim, heads, p.batch);
    };
    Tensor mQ = params.tma_q.get_tma_tensor(shape(p.seqlen_q, p.num_heads));
    Tensor mdO = params.tma_do.get_tma_tensor(shape(p.seqlen_q, p.num_heads));
    Tensor mK = params.tma_k.get_tma_tensor(shape(p.seqlen_k, p.num_heads_kv));
    Tensor mV = params.tma_v.get_tma_tensor(shape(p.seqlen_k, p.num_heads_kv));
    using TileQ = Shape<Int<kBlockM>, Int<kHeadDim>>;
    using TileK = Shape<Int<kBlockN>, Int<kHeadDim>>;
    Tensor gK = local_tile(mK(_, _, h_kv, b), TileK{}, make_coord(n_block, _0{}));
    Tensor gV = local_tile(mV(_, _, h_kv, b), TileK{}, make_coord(n_block, _0{}));
    auto [tKg, tKs] = tma_partition(params.tma_k, _0{}, Layout<_1>{},
                                    group_modes<0, 2>(sK), group_modes<0, 2>(gK));
    auto [tVg, tVs] = tma_partition(params.tma_v, _0{}, Layout<_1>{},
                                    group_modes<0, 2>(sV), group_modes<0, 2>(gV));
    auto& kv_barrier =
        reinterpret_cast<typename Pipeline::ProducerBarrierType&>(smem.kv_full);
    smem.kv_full.arrive_and_expect_tx(2 * Traits::kKTileBytes);
    copy(params.tma_k.with(kv_barrier, 0), tKg, tKs);
    copy(params.tma_v.with(kv_barrier, 0), tVg, tVs);

    const int64_t stats_pitch = row_stats_pitch(p.seqlen_q);
    auto write = cutlass::make_producer_start_state<Pipeline>();
    QueryWalk walk = first_step;
    for (int step = 0; step < num_steps; ++step) {
      const int h = walk.h, m0 = walk.m0;
      Tensor gQ = local_tile(mQ(_, _, h, b), TileQ{},
                             make_coord(m0 / kBlockM, _0{}));
      Tensor gdO = local_tile(mdO(_, _, h, b), TileQ{},
                              make_coord(m0 / kBlockM, _0{}));
      auto [tQg, tQs] = tma_partition(params.tma_q, _0{}, Layout<_1>{},
                                      group_modes<0, 2>(sQ),
                                      group_modes<0, 2>(gQ));
      auto [tdOg, tdOs] = tma_partition(params.tma_do, _0{}, Layout<_1>{},
                                        group_modes<0, 2>(sdO),
                                        group_modes<0, 2>(gdO));
      pipeline_q.producer_acquire(write);
      auto* barrier = pipeline_q.producer_get_barrier(write);
      copy(params.tma_q.with(*barrier, 0), tQg, tQs(_, write.index()));
      copy(params.tma_do.with(*barrier, 0), tdOg, tdOs(_, write.index()));
      const int64_t bh = static_cast<int64_t>(b) * p.num_heads + h;
      SM90_BULK_COPY_G2S::copy(scratch.row_stats + bh * stats_pitch + m0,
                               reinterpret_cast<uint64_t*>(barrier),
                               &smem.stats[write.index()][0],
                               Traits::kStatsBytes);
      ++write;
      walk.advance(kBlockM);
    }
    return;
  }

  // ---- consumers ----
  cutlass::arch::warpgroup_reg_alloc<kBwdConsumerRegisters>();
  const int tid = threadIdx.x - 128;  // 0 .. 255
  const int wg = warpgroup - 1;       // consumer warpgroup, 0 or 1
  const int wg_tid = tid % 128;
  typename Traits::MmaSdP mma_sdp;
  typename Traits::MmaKV mma_kv;
  typename Traits::MmaDq mma_dq;
  auto thr_sdp = mma_sdp.get_thread_slice(tid);
  auto thr_kv = mma_kv.get_thread_slice(tid);
  auto thr_dq = mma_dq.get_thread_slice(tid);

  Tensor tSrK = thr_sdp.partition_fragment_A(sK);     // (MMA, M, K)
  Tensor tSrV = thr_sdp.partition_fragment_A(sV);
  Tensor tSrQ = thr_sdp.partition_fragment_B(sQ);     // (MMA, N, K, stage)
  Tensor tSrdO = thr_sdp.partition_fragment_B(sdO);
  Tensor tKVrdOt = thr_kv.partition_fragment_B(sdOt);  // (MMA, N, K, stage)
  Tensor tKVrQt = thr_kv.partition_fragment_B(sQt);
  Tensor tDqrDs = thr_dq.partition_fragment_A(sDs);   // (MMA, M, K, buffer)
  Tensor tDqrKt = thr_dq.partition_fragment_B(sKt);   // (MMA, N, K)

  using TileSdP = Shape<Int<kBlockN>, Int<kBlockM>>;
  using TileKV = Shape<Int<kBlockN>, Int<kHeadDim>>;
  using TileDq = Shape<Int<kBlockM>, Int<kHeadDim>>;
  Tensor acc_dv = partition_fragment_C(mma_kv, TileKV{});
  Tensor acc_dk = partition_fragment_C(mma_kv, TileKV{});
  clear(acc_dv);
  clear(acc_dk);

  // (key, query) tile coordinates of this thread's S^T / dP^T elements.
  Tensor sdp_coords = thr_sdp.partition_C(make_identity_tensor(TileSdP{}));
  Tensor coords_rc = make_tensor(sdp_coords.data(),
                                 accumulator_rows_cols(sdp_coords.layout()));
  constexpr int kRows = decltype(size<0>(coords_rc))::value;  // keys
  constexpr int kCols = decltype(size<1>(coords_rc))::value;  // queries
  static_assert(kBlockM == 64 && sizeof(Element) == 2 && kRows == 2 &&
                    kCols == (Traits::kSplitD ? 8 : 16),
                "dS^T stores assume one 128-byte swizzle row per key");
  // dS^T store addresses: one base per thread (Traits::ds_store_base).
  const uint32_t ds_store_base =
      smem_addr(smem.ds.data()) + Traits::ds_store_base(tid);

  const ScoreMod score_mod_base = ScoreMod::make(p, b, h_kv * group, mask);
  const bool want_dalibi = kScoreMod && p.dalibi != nullptr;
  // Deterministic dalibi: each warp's column sums go to smem.alibi (by step
  // parity), and consumer warpgroup 0 sums them per row into
  // smem.alibi_rows beside its dQ half, for the dQ writer to add in turn.
  const bool dalibi_in_order = want_dalibi && p.deterministic;
  const float scale_log2 = p.softmax_scale_log2;

  // dS^T of the step whose dK product may still run (its A operand).
  Tensor rdS = make_tensor<Element>(
      partition_fragment_C(mma_sdp, Shape<Int<kBlockN>, Int<kBlockM>>{})
          .layout());
  // dS^T as dK's A operand: registers, or split-D shared memory (buffer 1;
  // P^T, dV's A operand, in buffer 0).
  auto tKVrdS = [&]() {
    if constexpr (Traits::kSplitD) {
      return thr_kv.partition_fragment_A(sDsT);  // (MMA, M, K, buffer)
    } else {
      return make_tensor(rdS.data(), accumulator_as_operand_a(rdS.layout()));
    }
  }();
  // The previous step's stage, released once its dK product is in.
  typename Pipeline::PipelineState release;
  bool release_pending = false;
  auto release_previous = [&]() __attribute__((always_inline)) {
    warpgroup_fence_operand(acc_dk);
    warpgroup_fence_operand(rdS);
    if (release_pending) pipeline_q.consumer_release(release);
    release_pending = false;
  };

  smem.kv_full.wait(0);
  typename Pipeline::PipelineState read;
  QueryWalk walk = first_step;
  constexpr int kHalfD = kHeadDim / 2;  // dQ columns of each warpgroup
  for (int step = 0; step < num_steps; ++step) {
    const int h = walk.h, m0 = walk.m0;
    const int64_t bh = static_cast<int64_t>(b) * p.num_heads + h;
    const int stage = read.index();
    const int ds_buffer = step % 2;
    ScoreMod score_mod = score_mod_base;
    if constexpr (kScoreMod) score_mod.alibi = Alibi::make(p, b, h, mask);

    Tensor acc_s = partition_fragment_C(mma_sdp, TileSdP{});
    Tensor acc_dp = partition_fragment_C(mma_sdp, TileSdP{});
    pipeline_q.consumer_wait(read);
    warpgroup_gemm_issue<true, false>(mma_sdp, tSrK, tSrQ(_, _, _, stage),
                                      acc_s);
    warpgroup_gemm_issue<true, false>(mma_sdp, tSrV, tSrdO(_, _, _, stage),
                                      acc_dp);
    const float2* stats = smem.stats[stage];
    Tensor s_rc = make_tensor(acc_s.data(),
                              accumulator_rows_cols(acc_s.layout()));
    Tensor dp_rc = make_tensor(acc_dp.data(),
                               accumulator_rows_cols(acc_dp.layout()));
    const bool tile_masked =
        mask.tile_needs_mask(m0, m0 + kBlockM, n0, n0 + kBlockN);

    const int warp = tid / 32, lane = tid % 32;
    // dalibi: the sums of column c over this warp's 16 keys (8 lanes share
    // a column), to shared memory per warp (deterministic mode: summed over
    // the warps in order inside the semaphore window) or added to the
    // workspace at once.
    auto add_alibi_column = [&](int c, float a0, float a1, float a2)
        __attribute__((always_inline)) {
#pragma unroll
      for (int off = 4; off < 32; off *= 2) {
        a0 += __shfl_xor_sync(0xffffffffu, a0, off);
        a1 += __shfl_xor_sync(0xffffffffu, a1, off);
        a2 += __shfl_xor_sync(0xffffffffu, a2, off);
      }
      const int col = get<1>(coords_rc(0, c));
      if (lane < 4) {
        if (p.deterministic) {
          smem.alibi[step % 2][warp][col] = make_float4(a0, a1, a2, 0.f);
        } else if (m0 + col < p.seqlen_q) {
          float* dst = &scratch.dalibi_rows[bh * p.seqlen_q + m0 + col].x;
          atomicAdd(dst, a0);
          atomicAdd(dst + 1, a1);
          atomicAdd(dst + 2, a2);
        }
      }
    };

    // P^T = exp2(logit - lse) in place of S^T (0 where masked); with
    // kWithGrads (dP^T in already) also dS^T = P^T (dP^T - delta), through
    // softcap's derivative, in place of dP^T, and the dalibi sums.
    // kMasked: kSegments says whether segment ids take part (without them a
    // masked tile tests only the positions, with no load per element).
    auto probs = [&](auto masked_c, auto segments_c, auto with_grads_c)
        __attribute__((always_inline)) {
      constexpr bool kMasked = decltype(masked_c)::value;
      constexpr bool kSegments = decltype(segments_c)::value;
      constexpr bool kWithGrads = decltype(with_grads_c)::value;
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        const int i = m0 + get<1>(coords_rc(0, c));
        const float lse2 = stats[get<1>(coords_rc(0, c))].x;
        [[maybe_unused]] MaskRow row = {};
        if constexpr (kMasked) {
          row = kSegments ? mask.row(i) : mask.row_by_position(i);
        }
        [[maybe_unused]] float a0 = 0.f, a1 = 0.f, a2 = 0.f;
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          const int jt = get<0>(coords_rc(r, 0)), j = n0 + jt;
          float prob;
          [[maybe_unused]] float capped = 0.f;
          if constexpr (kScoreMod) {
            const float logit = score_mod(s_rc(r, c), i, j, &capped);
            prob = exp2_approx(logit * kLog2e - lse2);
          } else {
            prob = exp2_approx(s_rc(r, c) * scale_log2 - lse2);
          }
          if constexpr (kMasked) {
            const bool seen = kSegments ? row.sees(j, smem.kv_segment[jt])
                                        : row.sees(j);
            if (!seen) prob = 0.f;
          }
          s_rc(r, c) = prob;
          if constexpr (kWithGrads) {
            const float dpv = dp_rc(r, c);
            float ds = prob * (dpv - stats[get<1>(coords_rc(0, c))].y);
            if constexpr (kScoreMod) {
              if (want_dalibi) {
                const float dist = -score_mod.alibi.grad_slope(i, j);
                const float pdp = prob * dpv;
                a0 += pdp * dist;
                a1 += prob * dist;
                a2 += pdp;
              }
              if (score_mod.softcap.enabled()) {
                ds *= score_mod.softcap.grad_from_output(capped);
              }
            }
            dp_rc(r, c) = ds;
          }
        }
        if constexpr (kScoreMod && kWithGrads) {
          if (want_dalibi) add_alibi_column(c, a0, a1, a2);
        }
      }
    };
    // fn(masked, segments) for this tile.
    auto with_mask = [&](auto fn) __attribute__((always_inline)) {
      if (!tile_masked) {
        fn(cute::false_type{}, cute::false_type{});
      } else if (mask.has_segments()) {
        fn(cute::true_type{}, cute::true_type{});
      } else {
        fn(cute::true_type{}, cute::false_type{});
      }
    };
    Tensor rP = make_tensor_like<Element>(acc_s);
    // A register tensor of the C layout as a wgmma A operand.
    auto as_operand_a = [](auto& t) __attribute__((always_inline)) {
      return make_tensor(t.data(), accumulator_as_operand_a(t.layout()));
    };
    auto convert = [](auto const& from, auto& to)
        __attribute__((always_inline)) {
#pragma unroll
      for (int e = 0; e < size(from); ++e) {
        to(e) = static_cast<Element>(from(e));
      }
    };
    Tensor acc_dq = partition_fragment_C(mma_dq, TileDq{});
    if constexpr (Traits::kSplitD) {
      // P^T and dS^T of this warpgroup's queries in one pass.
      warpgroup_wait<0>();
      warpgroup_fence_operand(acc_s);
      warpgroup_fence_operand(acc_dp);
      with_mask([&](auto masked, auto segments) {
        probs(masked, segments, cute::true_type{});
      });
      convert(acc_s, rP);
      convert(acc_dp, rdS);
      // Both warpgroups' GEMMs of the previous step, which read P^T and
      // dS^T, are complete (each waited for its own before staging dQ).
      if (step > 0) cutlass::arch::NamedBarrier::sync(256, kBarrierDsWritten);
      copy(rP, thr_sdp.partition_C(sDsT(_, _, 0)));
      copy(rdS, thr_sdp.partition_C(sDsT(_, _, 1)));
      cutlass::arch::fence_view_async_shared();  // for wgmma's reads
      cutlass::arch::NamedBarrier::sync(256, kBarrierDsWritten);
      warpgroup_gemm_issue<false, false>(mma_kv, tKVrdS(_, _, _, 0),
                                         tKVrdOt(_, _, _, stage), acc_dv);
      warpgroup_gemm_issue<false, false>(mma_kv, tKVrdS(_, _, _, 1),
                                         tKVrQt(_, _, _, stage), acc_dk);
      warpgroup_gemm_issue<true, false>(mma_dq, tDqrDs(_, _, _, 1), tDqrKt,
                                        acc_dq);
      // dV and dK are in: the Q/dO stage goes back to the producer while
      // dQ runs (with one stage, the next step's load waits for this).
      warpgroup_wait<1>();
      warpgroup_fence_operand(acc_dk);
      warpgroup_fence_operand(acc_dv);
      pipeline_q.consumer_release(read);
      warpgroup_wait<0>();
      warpgroup_fence_operand(acc_dq);
    } else {
      if constexpr (kScoreMod) {
        // Softcap's derivative needs each capped logit and dalibi P and dP
        // side by side: both products first, then one pass.
        warpgroup_wait<0>();
        release_previous();
        warpgroup_fence_operand(acc_s);
        warpgroup_fence_operand(acc_dp);
        with_mask([&](auto masked, auto segments) {
          probs(masked, segments, cute::true_type{});
        });
        convert(acc_s, rP);
        warpgroup_gemm_issue<false, true>(mma_kv, as_operand_a(rP),
                                          tKVrdOt(_, _, _, stage), acc_dv);
      } else {
        // P^T while dP^T is computed; dV += P^T dO while dS^T is.
        warpgroup_wait<1>();  // S^T (and the previous dK) is in
        release_previous();
        warpgroup_fence_operand(acc_s);
        with_mask([&](auto masked, auto segments) {
          probs(masked, segments, cute::false_type{});
        });
        convert(acc_s, rP);
        warpgroup_gemm_issue<false, true>(mma_kv, as_operand_a(rP),
                                          tKVrdOt(_, _, _, stage), acc_dv);
        warpgroup_wait<1>();  // dP^T is in (dV may still run)
        warpgroup_fence_operand(acc_dp);
  #pragma unroll
        for (int c = 0; c < kCols; ++c) {
          const float delta = stats[get<1>(coords_rc(0, c))].y;
  #pragma unroll
          for (int r = 0; r < kRows; ++r) {
            dp_rc(r, c) = s_rc(r, c) * (dp_rc(r, c) - delta);
          }
        }
      }
      convert(acc_dp, rdS);
      // dS^T to shared memory, two adjacent queries per 32-bit store, at
      // addresses derived from one per thread (see ds_store_base).
      {
        Tensor rdS_rc =
            make_tensor(rdS.data(), accumulator_rows_cols(rdS.layout()));
        const uint32_t base = ds_store_base + ds_buffer * Traits::kDsBufferBytes;
  #pragma unroll
        for (int r = 0; r < kRows; ++r) {
  #pragma unroll
          for (int c = 0; c < kCols; c += 2) {
            Element pair[2] = {rdS_rc(r, c), rdS_rc(r, c + 1)};
            asm volatile("st.shared.b32 [%0], %1;\n"
                         :: "r"(Traits::ds_store_offset(base, r, c / 2)),
                            "r"(*reinterpret_cast<const uint32_t*>(pair))
                         : "memory");
          }
        }
      }
      cutlass::arch::fence_view_async_shared();  // dS^T for wgmma's reads
      cutlass::arch::NamedBarrier::sync(256, kBarrierDsWritten);

      // dQ = dS K (this warpgroup's half of D), then dK += dS^T Q, which runs
      // on while dQ is staged and the next step's S^T and dP^T are issued:
      // its Q stage is released once the next step's first wait has seen it
      // complete.
      warpgroup_gemm_issue<true, false>(mma_dq, tDqrDs(_, _, _, ds_buffer),
                                        tDqrKt, acc_dq);
      warpgroup_gemm_issue<false, true>(mma_kv, tKVrdS, tKVrQt(_, _, _, stage),
                                        acc_dk);
      warpgroup_wait<1>();
      warpgroup_fence_operand(acc_dq);
      warpgroup_fence_operand(acc_dv);

    }

    // dQ to this warpgroup's half of the staging tile, float4 j of the
    // accumulator at dq_tile_index (bwd_dq_tile.h), once the writer has
    // added the previous step's.
    static_assert(size(decltype(acc_dq){}) == 4 * (kHalfD / 8),
                  "one float4 per 8-column group");
    if (step > 0) dq_handoff_sync(wg, kBarrierDqEmpty);
#pragma unroll
    for (int j = 0; j < kHalfD / 8; ++j) {
      *reinterpret_cast<float4*>(smem.dq +
                                 dq_tile_index<kHeadDim>(wg, j, wg_tid)) =
          make_float4(acc_dq(4 * j), acc_dq(4 * j + 1), acc_dq(4 * j + 2),
                      acc_dq(4 * j + 3));
    }
    if (dalibi_in_order && wg == 0 && wg_tid < kBlockM) {
      // Every warp's sums of this step are in (kBarrierDsWritten); the
      // other buffer of smem.alibi takes the next step's meanwhile.
      // Split-D: the column's 4 warps are those of its query half.
      constexpr int kWarps = Traits::kSplitD ? 4 : 8;
      const int w0 = Traits::kSplitD ? 4 * (wg_tid / 32) : 0;
      float4 sum = smem.alibi[step % 2][w0][wg_tid];
#pragma unroll
      for (int w = w0 + 1; w < w0 + kWarps; ++w) {
        const float4 part = smem.alibi[step % 2][w][wg_tid];
        sum.x += part.x;
        sum.y += part.y;
        sum.z += part.z;
      }
      smem.alibi_rows[wg_tid] = sum;
    }
    fence_shared_for_bulk_copy();
    dq_handoff_arrive(wg, kBarrierDqFull);
    release = read;
    release_pending = !Traits::kSplitD;  // split-D released it already
    ++read;
    walk.advance(kBlockM);
  }
  warpgroup_wait<0>();
  release_previous();

  // dK = softmax_scale * dS^T Q (the scale of the logits), dV as summed.
  // Both go through shared memory, over the Q and dO buffers (no GEMM reads
  // them once both warpgroups are here), so that global memory gets whole
  // rows: from registers, a warp's 4-byte stores would cover 8 rows with 16
  // bytes each, half of every 32-byte sector. Rows of D elements in 16-byte
  // chunks, chunk c of row r at c ^ (r % kXor): a warp's stores (8 rows, 4
  // column pairs in one chunk) then hit 32 distinct banks where kXor is 8.
  // kXor divides the row's chunks (12 at D = 96: kXor 4), so that the XOR
  // stays inside the row.
  Tensor kv_coords = thr_kv.partition_C(make_identity_tensor(TileKV{}));
  Tensor kv_coords_rc = make_tensor(kv_coords.data(),
                                    accumulator_rows_cols(kv_coords.layout()));
  Tensor dk_rc = make_tensor(acc_dk.data(), accumulator_rows_cols(acc_dk.layout()));
  Tensor dv_rc = make_tensor(acc_dv.data(), accumulator_rows_cols(acc_dv.layout()));
  static_assert(kBlockN * kHeadDim <= cute::cosize_v<typename Traits::SmemLayoutQ>,
                "a dK or dV tile fits in the Q (dO) buffers");
  T* sdk = reinterpret_cast<T*>(smem.q.data());
  T* sdv = reinterpret_cast<T*>(smem.dout.data());
  constexpr int kXor = (kHeadDim / 8) % 8 == 0 ? 8 : 4;
  static_assert((kHeadDim / 8) % kXor == 0, "the XOR stays inside a row");
  auto staged = [](int row, int chunk) {
    return row * kHeadDim + ((chunk ^ (row % kXor)) * 8);
  };
  cutlass::arch::NamedBarrier::sync(256, kBarrierDsWritten);
#pragma unroll
  for (int r = 0; r < size<0>(dk_rc); ++r) {
    const int row = get<0>(kv_coords_rc(r, 0));
#pragma unroll
    for (int c = 0; c < size<1>(dk_rc); c += 2) {
      const int col = get<1>(kv_coords_rc(r, c));
      const int at = staged(row, col / 8) + col % 8;
      *reinterpret_cast<uint32_t*>(sdk + at) =
          pack2<T>(dk_rc(r, c) * p.softmax_scale,
                   dk_rc(r, c + 1) * p.softmax_scale);
      *reinterpret_cast<uint32_t*>(sdv + at) =
          pack2<T>(dv_rc(r, c), dv_rc(r, c + 1));
    }
  }
  cutlass::arch::NamedBarrier::sync(256, kBarrierDsWritten);
  // 16 bytes per thread: the handler lays dK and dV out as K and V, whose
  // rows (TMA) are whole multiples of 16 bytes.
  T* dk = static_cast<T*>(p.dk) + b * p.dk_batch_stride +
          h_kv * p.dk_head_stride;
  T* dv = static_cast<T*>(p.dv) + b * p.dv_batch_stride +
          h_kv * p.dv_head_stride;
  constexpr int kChunks = kHeadDim / 8;  // per row
  static_assert(kBlockN * kChunks % 256 == 0, "whole passes");
#pragma unroll
  for (int v = tid; v < kBlockN * kChunks; v += 256) {
    const int row = v / kChunks, chunk = v % kChunks;
    const int j = n0 + row;
    if (j >= p.seqlen_k) continue;
    *reinterpret_cast<uint4*>(dk + j * p.dk_row_stride + chunk * 8) =
        *reinterpret_cast<const uint4*>(sdk + staged(row, chunk));
    *reinterpret_cast<uint4*>(dv + j * p.dv_row_stride + chunk * 8) =
        *reinterpret_cast<const uint4*>(sdv + staged(row, chunk));
  }
}

}  // namespace sm90
}  // namespace jax_flash
