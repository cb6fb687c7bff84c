// FlashAttention-3-style forward kernel for sm90 (TMA, wgmma, warp
// specialization), persistent with a dynamic tile scheduler up to D = 128.
//
// Work tiles are (query tile of 64 rows per consumer warpgroup, head,
// batch row) in the order of FwdTile::make: within a head the query tiles
// from the last one down, then the next head; under a causal mask (or any
// bound right of the diagonal) the heads go in sections of about one GPU's
// worth of tiles, each section's query tiles from the last one down over
// all its heads, so that the longest run first. With 192-row tiles the
// first query tile of a head is the partial one (kPadFirstTile in the
// traits: its padding rows come before row 0). Persistent
// (Traits::kPersistent, D <= 128): one CTA per SM; a CTA starts with tile
// blockIdx.x and then takes the next unclaimed tile from a counter in
// global memory (one atomicAdd per tile), so the tiles in flight stay a
// window of consecutive tiles (the K/V of a section's few heads, which stay
// in L2) and no CTA idles while another holds a long tile. Otherwise (D > 128,
// where the loop's state would spill) one CTA per tile, which claims no
// other. Three or four warpgroups:
//   producer (warpgroup 0): one thread claims the tiles, hands each one to
//     the consumers with its Q tile (q_full) in one of Traits::kQStages Q
//     buffers once they are done with the tile that buffer held (q_empty),
//     and through two mbarrier pipelines (K and V, two or three stages
//     each) loads every visible K/V tile from the last one down; its
//     registers go to the consumers (setmaxnreg). With two Q buffers (the
//     persistent grid) the next tile's Q, and its first K/V tiles as the
//     stages free up, load while the consumers still compute this tile.
//   consumers (warpgroups 1 and 2, and 3 in the plain variant at D = 64;
//     tile_size.h says why): 64 query rows each; per K/V tile
//     S = Q K^T (wgmma, both operands in shared memory), logits and masks,
//     online softmax in registers, then O += P V with P converted in
//     registers as wgmma's A operand and V read from shared memory.
//     The source lets a warpgroup's softmax of one tile run while the
//     tensor cores compute the next tile's S and the previous tile's P V;
//     ptxas keeps that only in the score-modifier variant and elsewhere
//     moves the wait for P V above the softmax (pinning it below measured
//     0-8% slower with the turns: docs/performance.md). Across the
//     warpgroups, named barriers take turns on the tensor cores so that one
//     warpgroup's softmax overlaps another's GEMMs (FlashAttention-3's
//     intra-warpgroup pipelining and ping-pong scheduling, arXiv 2407.08608).
// The epilogue divides O by the row sums and writes O through shared memory
// (the tile's Q buffer) in 16-byte row chunks, and lse from registers.
// Masks and score modifiers are those of mask.h (docs/ffi_contract.md),
// applied per element only on tiles that cross a mask boundary.
#pragma once

#include <cmath>
#include <type_traits>

#include <cute/tensor.hpp>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/pipeline/pipeline.hpp>

#include "common/flash.h"
#include "common/mask.h"
#include "sm90/flash_fwd_kernel_traits.h"
#include "sm90/fwd_tile.h"
#include "sm90/softmax.h"
#include "common/utils.h"

namespace jax_flash {
namespace sm90 {

// Kernel parameters: the shared FwdParams and the TMA descriptors (which
// must live in kernel parameter or constant memory).
template <typename Traits>
struct FwdKernelParams {
  FwdParams p;
  typename Traits::TmaQ tma_q;
  typename Traits::TmaKV tma_k;
  typename Traits::TmaKV tma_v;
};

// Issues c (+)= a * b over every k step on one warpgroup as one wgmma
// batch and returns without waiting: the caller waits with
// cute::warpgroup_wait<N>() (batches complete in issue order) before it
// reads c or overwrites a. kZeroInit starts from c = 0; kRegisterA: a is a
// register fragment (else a shared memory descriptor, like b).
template <bool kZeroInit, bool kRegisterA, class Mma, class TensorA,
          class TensorB, class TensorC>
__device__ __forceinline__ void warpgroup_gemm_issue(Mma& mma,
                                                     TensorA const& a,
                                                     TensorB const& b,
                                                     TensorC& c) {
  if constexpr (kRegisterA) {
    cute::warpgroup_fence_operand(const_cast<TensorA&>(a));
  }
  cute::warpgroup_fence_operand(c);
  cute::warpgroup_arrive();
  if constexpr (kZeroInit) mma.accumulate_ = cute::GMMA::ScaleOut::Zero;
#pragma unroll
  for (int k = 0; k < cute::size<2>(a); ++k) {
    cute::gemm(mma, a(cute::_, cute::_, k), b(cute::_, cute::_, k), c);
    mma.accumulate_ = cute::GMMA::ScaleOut::One;
  }
  cute::warpgroup_commit_batch();
  cute::warpgroup_fence_operand(c);
  if constexpr (kRegisterA) {
    cute::warpgroup_fence_operand(const_cast<TensorA&>(a));
  }
}

// Turn-taking of the consumer warpgroups on the tensor cores ("ping-pong",
// round robin with three): a warpgroup issues its GEMMs only in its turn
// and hands the turn to the next one once they are issued, so that one
// warpgroup's softmax runs while another's GEMMs occupy the tensor cores.
// One named barrier per warpgroup, each completed by 128 threads waiting
// (its warpgroup) and 128 arriving (the one before it). Named barriers in
// CUTLASS numbering, past its reserved ones: with W consumer warpgroups the
// turns take 0 .. W - 1, each warpgroup's epilogue W + its index.
template <bool kEnabled, int kWarpgroups>
struct TensorCoreTurns {
  static_assert(kWarpgroups == 2 || kWarpgroups == 3, "two or three");
  static constexpr uint32_t kThreads = 256;
  int warpgroup;  // consumer warpgroup, 0 .. kWarpgroups - 1

  // Warpgroup 0 takes the first turn.
  __device__ __forceinline__ void start() const {
    if constexpr (kEnabled) {
      if (warpgroup == kWarpgroups - 1) {
        cutlass::arch::NamedBarrier::arrive(kThreads, 0);
      }
    }
  }
  __device__ __forceinline__ void wait_turn() const {
    if constexpr (kEnabled) {
      cutlass::arch::NamedBarrier::sync(kThreads, warpgroup);
    }
  }
  __device__ __forceinline__ void pass_turn() const {
    if constexpr (kEnabled) {
      const int next = kWarpgroups == 2 ? 1 - warpgroup
                       : warpgroup + 1 == kWarpgroups ? 0 : warpgroup + 1;
      cutlass::arch::NamedBarrier::arrive(kThreads, next);
    }
  }
  // After the last tile: warpgroup 0 takes the turn the last warpgroup
  // handed over last, which leaves every barrier with as many arrivals as
  // waits (all warpgroups take the same number of turns, one per GEMM
  // batch of the same tiles).
  __device__ __forceinline__ void finish() const {
    if constexpr (kEnabled) {
      if (warpgroup == 0) cutlass::arch::NamedBarrier::sync(kThreads, 0);
    }
  }
};

// A work tile as the producer and the consumers both derive it from its
// index: its place, its batch row's mask and the K/V tiles [n_lo(), n_hi()]
// holding the keys [key_lo, key_hi) some of its rows see. The producer must
// load exactly the K/V tiles the consumers compute, so both take them here.
// m_shift: the first query tile's first row, 0 or (Traits::kPadFirstTile)
// negative.
template <int kBlockM, int kBlockN>
struct WorkTile {
  FwdTile w;
  int m0;  // first query row (negative rows are padding)
  AttentionMask mask;
  int key_lo, key_hi;

  __device__ __forceinline__ static WorkTile make(const FwdParams& p,
                                                  int tile, int num_m_blocks,
                                                  int section_rows,
                                                  int m_shift) {
    WorkTile t;
    t.w = FwdTile::make(tile, num_m_blocks, p.num_heads, p.batch,
                        section_rows);
    t.m0 = t.w.m_block * kBlockM + m_shift;
    t.mask = AttentionMask::make(p, t.w.b);
    t.key_lo = t.mask.key_begin(t.m0);
    t.key_hi = t.mask.key_end(t.m0 + kBlockM);
    return t;
  }
  __device__ __forceinline__ bool has_keys() const { return key_lo < key_hi; }
  __device__ __forceinline__ int n_lo() const { return key_lo / kBlockN; }
  __device__ __forceinline__ int n_hi() const { return (key_hi - 1) / kBlockN; }
};

// Out = 0 and lse = -inf for query rows [m0, m0 + kBlockM) of (b, h) from
// row 0 on: the tile sees no key.
template <typename Traits>
__device__ void write_empty_tile(const FwdParams& p, int b, int h, int m0,
                                 int tid, int num_threads) {
  using T = typename Traits::T;
  constexpr int kChunks = Traits::kHeadDim / 8;  // 16-byte chunks per row
  int rows = min(Traits::kBlockM, p.seqlen_q - m0);
  if constexpr (Traits::kPadFirstTile) {
    rows -= max(0, -m0);
    m0 = max(0, m0);
  }
  T* out = static_cast<T*>(p.out) + b * p.out_batch_stride +
           h * p.out_head_stride + static_cast<int64_t>(m0) * p.out_row_stride;
  for (int c = tid; c < rows * kChunks; c += num_threads) {
    *reinterpret_cast<uint4*>(out + (c / kChunks) * p.out_row_stride +
                              (c % kChunks) * 8) = make_uint4(0, 0, 0, 0);
  }
  float* lse = p.lse + (static_cast<int64_t>(b) * p.num_heads + h) *
                           p.seqlen_q + m0;
  for (int r = tid; r < rows; r += num_threads) lse[r] = -INFINITY;
}

// kScoreMod: logits through ScoreMod (softcap, alibi, a non-positive scale);
// kSegments: segment ids may be given (tested per tile). Without them the
// masked tiles test positions only: with the segment test compiled in, every
// masked element paid for a predicated-off segment id load and its address
// (about 600 instructions a thread per masked tile, 0.9 us on an H200).
template <typename Traits, bool kScoreMod, bool kSegments>
__global__ void __launch_bounds__(Traits::kThreads, 1)
flash_fwd_sm90_kernel(const __grid_constant__ FwdKernelParams<Traits> params) {
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
  const FwdParams& p = params.p;
  const int num_m_blocks = ceil_div(p.seqlen_q, kBlockM);
  // Sections only where a query tile's length grows with its index
  // (causal, or any bound right of the diagonal): with a full mask the
  // tiles are equal and a head's query tiles, run back to back, share
  // their K/V reads in L2 (sections measured 4% slower at full 1k, D = 128).
  const int section_rows =
      p.window_right >= 0 ? fwd_section_rows(num_m_blocks, p.num_sms) : 1;
  static_assert(!(Traits::kPadFirstTile && kSegments),
                "padding rows would index the query segment ids");
  const int m_shift =
      Traits::kPadFirstTile ? p.seqlen_q - num_m_blocks * kBlockM : 0;
  // Warp-uniform (a shuffle from lane 0): kept in a uniform register, where
  // threadIdx.x / 128 is re-read from the special register at every use
  // under register pressure.
  const int warpgroup = __shfl_sync(0xffffffffu, threadIdx.x / 128, 0);

  typename Pipeline::Params pipeline_params;
  pipeline_params.transaction_bytes = Traits::kKVTileBytes;
  pipeline_params.role = warpgroup == 0
                             ? Pipeline::ThreadCategory::Producer
                             : Pipeline::ThreadCategory::Consumer;
  pipeline_params.is_leader = threadIdx.x == 0;
  pipeline_params.num_consumers = Traits::kConsumerThreads;
  Pipeline pipeline_k(smem.pipeline_k, pipeline_params, Shape<_1, _1, _1>{});
  Pipeline pipeline_v(smem.pipeline_v, pipeline_params, Shape<_1, _1, _1>{});
  if (threadIdx.x == 0) {
#pragma unroll
    for (int s = 0; s < Traits::kQStages; ++s) {
      smem.q_full[s].init(1);
      smem.q_empty[s].init(Traits::kConsumerThreads);
    }
  }
  cutlass::arch::fence_barrier_init();
  __syncthreads();

  Tensor sQ = make_tensor(make_smem_ptr(smem.q.data()),
                          typename Traits::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(smem.k.data()),
                          typename Traits::SmemLayoutKV{});
  Tensor sV = make_tensor(make_smem_ptr(smem.v.data()),
                          typename Traits::SmemLayoutKV{});
  Tensor sVt = make_tensor(make_smem_ptr(smem.v.data()),
                           typename Traits::SmemLayoutVt{});

  if (warpgroup == 0) {
    // ---- producer ----
    cutlass::arch::warpgroup_reg_dealloc<Traits::kProducerRegisters>();
    if (threadIdx.x != 0) return;
    const int num_tiles = num_m_blocks * p.num_heads * p.batch;
    auto shape = [](int s, int heads, const FwdParams& q) {
      return make_shape(s, q.head_dim, heads, q.batch);
    };
    Tensor mQ = params.tma_q.get_tma_tensor(shape(p.seqlen_q, p.num_heads, p));
    Tensor mK =
        params.tma_k.get_tma_tensor(shape(p.seqlen_k, p.num_heads_kv, p));
    Tensor mV =
        params.tma_v.get_tma_tensor(shape(p.seqlen_k, p.num_heads_kv, p));
    auto write = cutlass::make_producer_start_state<Pipeline>();
    int tile = blockIdx.x;
    for (int it = 0;; ++it) {
      // Claim the next tile first: the atomic's latency passes under this
      // tile's loads.
      // Without persistence there is no next tile: the CTA ends through
      // the same kNoTile hand-over as a persistent CTA out of work.
      int next = num_tiles;
      if constexpr (Traits::kPersistent) {
        if (tile < num_tiles) next = gridDim.x + atomicAdd(p.tile_counter, 1);
      }
      // Q stage of this tile; the consumers are done with the tile it held
      // before (with two stages, the one before the tile they compute now).
      const int qs = it % Traits::kQStages;
      if (it >= Traits::kQStages) {
        smem.q_empty[qs].wait((it / Traits::kQStages - 1) & 1);
      }
      if (tile >= num_tiles) {
        smem.tile[qs] = kNoTile;
        smem.q_full[qs].arrive();
        return;
      }
      smem.tile[qs] = tile;  // published by the arrival on q_full (release)
      const auto t = WorkTile<kBlockM, kBlockN>::make(p, tile, num_m_blocks,
                                                      section_rows, m_shift);
      const FwdTile w = t.w;
      if (!t.has_keys()) {  // no key to load; the consumers write zeros
        smem.q_full[qs].arrive();
        tile = next;
        continue;
      }
      const int kv_h = w.h / (p.num_heads / p.num_heads_kv);
      // Rows from m_shift on (TMA fills the padding rows before row 0 and
      // past the end with zeros).
      Tensor gQ = local_tile(
          domain_offset(make_coord(m_shift, _0{}), mQ(_, _, w.h, w.b)),
          Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_coord(w.m_block, _0{}));
      Tensor gK = local_tile(mK(_, _, kv_h, w.b),
                             Shape<Int<kBlockN>, Int<kHeadDim>>{},
                             make_coord(_, _0{}));  // (N, D, n)
      Tensor gV = local_tile(mV(_, _, kv_h, w.b),
                             Shape<Int<kBlockN>, Int<kHeadDim>>{},
                             make_coord(_, _0{}));
      auto [tQg, tQs] = tma_partition(params.tma_q, _0{}, Layout<_1>{},
                                      group_modes<0, 2>(sQ),
                                      group_modes<0, 2>(gQ));
      auto [tKg, tKs] = tma_partition(params.tma_k, _0{}, Layout<_1>{},
                                      group_modes<0, 2>(sK),
                                      group_modes<0, 2>(gK));
      auto [tVg, tVs] = tma_partition(params.tma_v, _0{}, Layout<_1>{},
                                      group_modes<0, 2>(sV),
                                      group_modes<0, 2>(gV));
      smem.q_full[qs].arrive_and_expect_tx(Traits::kQBytes);
      copy(params.tma_q.with(
               reinterpret_cast<typename Pipeline::ProducerBarrierType&>(
                   smem.q_full[qs]),
               0),
           tQg, tQs(_, qs));
      const int n_lo = t.n_lo();
      for (int n = t.n_hi(); n >= n_lo; --n) {
        pipeline_k.producer_acquire(write);
        copy(params.tma_k.with(*pipeline_k.producer_get_barrier(write), 0),
             tKg(_, n), tKs(_, write.index()));
        pipeline_v.producer_acquire(write);
        copy(params.tma_v.with(*pipeline_v.producer_get_barrier(write), 0),
             tVg(_, n), tVs(_, write.index()));
        ++write;
      }
      tile = next;
    }
  }

  // ---- consumers ----
  cutlass::arch::warpgroup_reg_alloc<Traits::kConsumerRegisters>();
  const int tid = threadIdx.x - 128;  // 0 .. kConsumerThreads - 1
  typename Traits::MmaS mma_s;
  typename Traits::MmaO mma_o;
  auto thr_s = mma_s.get_thread_slice(tid);
  auto thr_o = mma_o.get_thread_slice(tid);
  Tensor tSrQ = thr_s.partition_fragment_A(sQ);   // (MMA, MMA_M, MMA_K, stage)
  Tensor tSrK = thr_s.partition_fragment_B(sK);   // (MMA, MMA_N, MMA_K, stage)
  Tensor tOrV = thr_o.partition_fragment_B(sVt);  // (MMA, MMA_N, MMA_K, stage)
  Tensor tOrO =
      partition_fragment_C(mma_o, Shape<Int<kBlockM>, Int<kHeadDim>>{});
  Tensor o_rc = make_tensor(tOrO.data(), accumulator_rows_cols(tOrO.layout()));

  // Tile coordinates (row, column) of this thread's score elements.
  Tensor score_coords =
      thr_s.partition_C(make_identity_tensor(Shape<Int<kBlockM>,
                                                   Int<kBlockN>>{}));
  Tensor coords_rc = make_tensor(score_coords.data(),
                                 accumulator_rows_cols(score_coords.layout()));
  constexpr int kRows = decltype(size<0>(coords_rc))::value;
  RowSoftmax<kRows> softmax;
  // With score modifiers the scores are natural-log logits already scaled.
  const float scale_log2 = kScoreMod ? kLog2e : p.softmax_scale_log2;
  using Masked = cute::true_type;
  using Unmasked = cute::false_type;

  const TensorCoreTurns<Traits::kPingPong, Traits::kConsumerWarpgroups> turns{
      warpgroup - 1};
  turns.start();
  float rescale[kRows];
  Tensor rP = make_tensor<Element>(
      partition_fragment_C(mma_s, Shape<Int<kBlockM>, Int<kBlockN>>{})
          .layout());
  Tensor tOrP = make_tensor(rP.data(), accumulator_as_operand_a(rP.layout()));
  auto convert_p = [&](auto const& tSrS) __attribute__((always_inline)) {
#pragma unroll
    for (int e = 0; e < size(tSrS); ++e) rP(e) = static_cast<Element>(tSrS(e));
  };
  // The K/V stage of the next S GEMM; runs on across tiles, as the
  // producer's does.
  typename Pipeline::PipelineState read;

  for (int it = 0;; ++it) {
    const int qs = it % Traits::kQStages;
    smem.q_full[qs].wait((it / Traits::kQStages) & 1);
    const int tile = smem.tile[qs];
    if (tile == kNoTile) break;
    const auto t = WorkTile<kBlockM, kBlockN>::make(p, tile, num_m_blocks,
                                                    section_rows, m_shift);
    const FwdTile w = t.w;
    const int m0 = t.m0;
    const AttentionMask mask = t.mask;
    if (!t.has_keys()) {
      smem.q_empty[qs].arrive();
      write_empty_tile<Traits>(p, w.b, w.h, m0, tid, Traits::kConsumerThreads);
      continue;
    }
    const int n_lo = t.n_lo();
    const int n_hi = t.n_hi();
    const ScoreMod score_mod = ScoreMod::make(p, w.b, w.h, mask);
    // Tiles wholly inside the unmasked key range skip the per-element mask.
    int free_lo, free_hi;
    mask.unmasked_keys(m0, m0 + kBlockM, &free_lo, &free_hi);
    const int full_lo = max(n_lo, ceil_div(free_lo, kBlockN));
    const int full_hi = min(n_hi, free_hi / kBlockN - 1);

    // Logits, then (kMasked: a tile that crosses a mask boundary) the mask.
    // The mask is a compile-time choice so that the loop over tiles wholly
    // inside the visible range carries none of its code or registers.
    auto mask_and_modify = [&](auto& s_rc, int n, auto masked_c)
        __attribute__((always_inline)) {
      constexpr bool kMasked = decltype(masked_c)::value;
      const int n0 = n * kBlockN;
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const int i = m0 + get<0>(coords_rc(r, 0));
        const MaskRow row =
            kSegments ? mask.row(i) : mask.row_by_position(i);
#pragma unroll
        for (int c = 0; c < size<1>(s_rc); ++c) {
          const int j = n0 + get<1>(coords_rc(r, c));
          if constexpr (kScoreMod) s_rc(r, c) = score_mod(s_rc(r, c), i, j);
          if constexpr (kMasked && kSegments) {
            const int kv_segment = mask.has_segments()
                ? mask.kv_segment_ids[min(j, p.seqlen_k - 1)] : 0;
            if (!row.sees(j, kv_segment)) s_rc(r, c) = -INFINITY;
          } else if constexpr (kMasked) {
            if (!row.sees(j)) s_rc(r, c) = -INFINITY;
          }
        }
      }
    };

    // Software pipeline over the K/V tiles, from the last one down (tile n
    // follows tile n + 1): while the softmax of S(n) runs on the CUDA
    // cores, the tensor cores compute O += P(n + 1) V(n + 1). Per step:
    //   issue S(n) = Q K(n)^T; rescale O by the max's growth at S(n + 1)
    //   (under the S GEMM); issue O += P(n + 1) V(n + 1);
    //   wait for S(n); softmax of S(n) (overlapping the P V product);
    //   wait for O; P(n) = bf16(S(n)).
    clear(tOrO);
    softmax.init();
    {
      Tensor tSrS =
          partition_fragment_C(mma_s, Shape<Int<kBlockM>, Int<kBlockN>>{});
      pipeline_k.consumer_wait(read);
      turns.wait_turn();
      warpgroup_gemm_issue<true, false>(mma_s, tSrQ(_, _, _, qs),
                                        tSrK(_, _, _, read.index()), tSrS);
      turns.pass_turn();
      warpgroup_wait<0>();
      warpgroup_fence_operand(tSrS);
      pipeline_k.consumer_release(read);
      Tensor s_rc =
          make_tensor(tSrS.data(), accumulator_rows_cols(tSrS.layout()));
      if (n_hi < full_lo || n_hi > full_hi) {
        mask_and_modify(s_rc, n_hi, Masked{});
      } else {
        mask_and_modify(s_rc, n_hi, Unmasked{});
      }
      // O is 0: the rescale (0 or 1) that the next P V product applies
      // leaves it 0.
      softmax.update(s_rc, scale_log2, rescale);
      convert_p(tSrS);
    }
    typename Pipeline::PipelineState read_v = read;  // V tile of P in hand
    ++read;
    // Always inlined: a call would move the register state to the stack.
    auto step = [&](int n, auto masked_c) __attribute__((always_inline)) {
      Tensor tSrS =
          partition_fragment_C(mma_s, Shape<Int<kBlockM>, Int<kBlockN>>{});
      pipeline_k.consumer_wait(read);
      pipeline_v.consumer_wait(read_v);
      turns.wait_turn();
      warpgroup_gemm_issue<true, false>(mma_s, tSrQ(_, _, _, qs),
                                        tSrK(_, _, _, read.index()), tSrS);
      // O takes the last softmax's rescale while the tensor cores compute
      // S(n), just before the P V product that accumulates into it.
      RowSoftmax<kRows>::rescale_rows(o_rc, rescale);
      warpgroup_gemm_issue<false, true>(mma_o, tOrP,
                                        tOrV(_, _, _, read_v.index()), tOrO);
      turns.pass_turn();
      warpgroup_wait<1>();  // S(n) is in
      warpgroup_fence_operand(tSrS);
      pipeline_k.consumer_release(read);
      Tensor s_rc =
          make_tensor(tSrS.data(), accumulator_rows_cols(tSrS.layout()));
      mask_and_modify(s_rc, n, masked_c);
      softmax.update(s_rc, scale_log2, rescale);
      warpgroup_fence_operand(tSrS);
      warpgroup_wait<0>();  // O += P(n + 1) V(n + 1) is in
      warpgroup_fence_operand(tOrO);
      pipeline_v.consumer_release(read_v);
      convert_p(tSrS);
      read_v = read;
      ++read;
    };
    // Tiles above the visible range's last whole tile (the causal
    // diagonal), then the whole tiles, then those below (a window's left
    // edge).
    int n = n_hi - 1;
    for (; n >= n_lo && n > full_hi; --n) step(n, Masked{});
    for (; n >= n_lo && n >= full_lo; --n) step(n, Unmasked{});
    for (; n >= n_lo; --n) step(n, Masked{});
    // O += P(n_lo) V(n_lo)
    pipeline_v.consumer_wait(read_v);
    turns.wait_turn();
    RowSoftmax<kRows>::rescale_rows(o_rc, rescale);
    warpgroup_gemm_issue<false, true>(mma_o, tOrP,
                                      tOrV(_, _, _, read_v.index()), tOrO);
    turns.pass_turn();
    warpgroup_wait<0>();
    warpgroup_fence_operand(tOrO);
    pipeline_v.consumer_release(read_v);

    // Epilogue: O / rowsum (rows past q_len give 0 and lse -inf), staged
    // in this warpgroup's half of the tile's Q buffer, which its GEMMs no
    // longer read (each consumer warpgroup's S GEMM reads only its own 64
    // rows of Q), by stmatrix, then copied out in 16-byte row chunks.
    // Straight from the accumulator, each 4-byte store of a warp touched 8
    // rows; with 4-byte shared stores instead, the swizzled addresses cost
    // as much (about 800 instructions a thread either way, 1.6 us a tile on
    // an H200, with the tensor cores idle for most of it).
    float inv_sum[kRows];
    float lse[kRows];
    softmax.finalize(inv_sum, lse, scale_log2);
    Tensor out_coords = thr_o.partition_C(
        make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
    Tensor out_rc = make_tensor(out_coords.data(),
                                accumulator_rows_cols(out_coords.layout()));
    Tensor sO = sQ(_, _, qs);  // (kBlockM, D)
    float* lse_out =
        p.lse + (static_cast<int64_t>(w.b) * p.num_heads + w.h) * p.seqlen_q;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int i = m0 + get<0>(out_rc(r, 0));
      const bool live = i < mask.q_len;
      const float scale = live ? inv_sum[r] : 0.f;
#pragma unroll
      for (int c = 0; c < size<1>(o_rc); ++c) o_rc(r, c) *= scale;
      if (tid % 4 == 0 && i < p.seqlen_q &&
          (!Traits::kPadFirstTile || i >= 0)) {
        lse_out[i] = live ? lse[r] : -INFINITY;
      }
    }
    {
      Tensor rO = make_tensor_like<Element>(tOrO);
#pragma unroll
      for (int e = 0; e < size(tOrO); ++e) {
        rO(e) = static_cast<Element>(tOrO(e));
      }
      auto store_o = make_tiled_copy_C(
          Copy_Atom<SM90_U32x4_STSM_N, Element>{}, mma_o);
      auto thr_store_o = store_o.get_thread_slice(tid);
      copy(store_o, thr_store_o.retile_S(rO), thr_store_o.partition_D(sO));
    }
    constexpr int kWarpgroupRows = kBlockM / Traits::kConsumerWarpgroups;
    const int first_row =
        get<0>(out_rc(0, 0)) / kWarpgroupRows * kWarpgroupRows;
    cutlass::arch::NamedBarrier::sync(
        128, Traits::kConsumerWarpgroups + warpgroup - 1);
    {
      constexpr int kChunks = kHeadDim / 8;  // 16-byte chunks of a row
      T* out = static_cast<T*>(p.out) + w.b * p.out_batch_stride +
               w.h * p.out_head_stride;
      const int rows = min(kWarpgroupRows, p.seqlen_q - (m0 + first_row));
      const int padding_rows =
          Traits::kPadFirstTile ? max(0, -(m0 + first_row)) : 0;
#pragma unroll
      for (int k = tid % 128; k < kWarpgroupRows * kChunks; k += 128) {
        const int row = k / kChunks;
        const int col = (k % kChunks) * 8;
        if (row < rows && (!Traits::kPadFirstTile || row >= padding_rows)) {
          *reinterpret_cast<uint4*>(
              out + static_cast<int64_t>(m0 + first_row + row) *
                        p.out_row_stride + col) =
              *reinterpret_cast<const uint4*>(&sO(first_row + row, col));
        }
      }
    }
    // This tile's Q buffer may take a later tile's Q once every consumer
    // thread is done with it; the TMA that refills it writes through the
    // async proxy, ordered after these generic accesses by the fence.
    cutlass::arch::fence_view_async_shared();
    smem.q_empty[qs].arrive();
  }
  turns.finish();
}

}  // namespace sm90
}  // namespace jax_flash
