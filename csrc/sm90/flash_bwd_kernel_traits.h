// Types of the sm90 backward kernel for one (dtype, head dim): tile shape,
// shared-memory layouts (swizzled for wgmma and TMA, with transposed views
// of the same bytes), the three tiled wgmma operations, the TMA copies and
// the shared storage.
//
// The keys are the M of the key-side products, so that P^T and dS^T come out
// of one GEMM in the register layout the next one takes as its A operand:
//   S^T  = K Q^T,  dP^T = V dO^T      (MmaSdP: 128 keys x 64 queries, ss)
//   dV  += P^T dO, dK  += dS^T Q      (MmaKV: 128 keys x D, A in registers)
//   dQ   = dS K                       (MmaDq: 64 queries x D, ss; the two
//                                      warpgroups split D)
// Split-D (D > 128, bwd_tile_size.h): 64 keys; MmaSdP gives each warpgroup
// 32 of the 64 queries, and MmaKV, now ss with P^T and dS^T read from
// shared memory, gives each D / 2 columns.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/numeric_types.h>
#include <cutlass/gemm/collective/builders/sm90_common.inl>
#include <cutlass/pipeline/pipeline.hpp>

#include "common/flash.h"
#include "sm90/bwd_dq_tile.h"
#include "sm90/bwd_tile_size.h"
#include "sm90/wgmma_shape.h"

namespace jax_flash {
namespace sm90 {

template <typename T_, int kHeadDim_>
struct BwdKernelTraits {
  using T = T_;
  using Element = std::conditional_t<std::is_same_v<T, __nv_bfloat16>,
                                     cutlass::bfloat16_t, cutlass::half_t>;
  static_assert(sizeof(Element) == sizeof(T), "same 16-bit storage");
  static constexpr int kHeadDim = kHeadDim_;
  static_assert(bwd_supports_head_dim(kHeadDim), "see bwd_tile_size.h");
  static constexpr bool kSplitD = bwd_split_head_dim(kHeadDim);
  static constexpr int kBlockM = kBwdBlockM;
  static constexpr int kBlockN = bwd_block_n(kHeadDim);
  static constexpr int kStages = bwd_stages(kHeadDim);
  static constexpr int kConsumerThreads = kBwdConsumerWarpgroups * 128;
  static constexpr int kThreads = kBwdThreads;
  static_assert(kBwdConsumerWarpgroups == 2, "two consumer warpgroups");
  static_assert(kSplitD ? kBlockN == 64 : kBlockN == 64 * 2,
                "split-D: one 64-key slab shared by both warpgroups; else "
                "one each");

  using BlockM = cute::Int<kBlockM>;
  using BlockN = cute::Int<kBlockN>;
  using HeadDim = cute::Int<kHeadDim>;
  using HalfHeadDim = cute::Int<kHeadDim / 2>;

  // S^T and dP^T: both operands from shared memory, K-major (D contiguous);
  // the consumer warpgroups stack along M (keys), or split-D along N
  // (queries).
  using MmaSdPSlabs = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<Element, Element, float,
                                 cute::Shape<cute::_64, BlockM, HeadDim>>(),
      cute::Layout<cute::Shape<cute::_2, cute::_1, cute::_1>>{}));
  using MmaSdPSplit = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<Element, Element, float,
                                 cute::Shape<BlockN, cute::Int<kBlockM / 2>,
                                             HeadDim>>(),
      cute::Layout<cute::Shape<cute::_1, cute::_2, cute::_1>>{}));
  using MmaSdP = std::conditional_t<kSplitD, MmaSdPSplit, MmaSdPSlabs>;
  static_assert(wgmma_n<MmaSdP>() == (kSplitD ? kBlockM / 2 : kBlockM),
                JAX_FLASH_ONE_WGMMA_SPANS_N);
  // dV and dK: A = P^T or dS^T from registers, B = dO or Q read MN-major
  // (their D is contiguous, and D is the N here). Split-D: A from shared
  // memory (P^T in dS buffer 0, dS^T in buffer 1), each warpgroup D / 2.
  using MmaKVSlabs = decltype(cute::make_tiled_mma(
      cute::GMMA::rs_op_selector<Element, Element, float,
                                 cute::Shape<cute::_64, HeadDim, BlockM>,
                                 cute::GMMA::Major::K,
                                 cute::GMMA::Major::MN>(),
      cute::Layout<cute::Shape<cute::_2, cute::_1, cute::_1>>{}));
  using MmaKVSplit = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<Element, Element, float,
                                 cute::Shape<BlockN, HalfHeadDim, BlockM>,
                                 cute::GMMA::Major::K,
                                 cute::GMMA::Major::MN>(),
      cute::Layout<cute::Shape<cute::_1, cute::_2, cute::_1>>{}));
  using MmaKV = std::conditional_t<kSplitD, MmaKVSplit, MmaKVSlabs>;
  static_assert(wgmma_n<MmaKV>() == (kSplitD ? kHeadDim / 2 : kHeadDim),
                JAX_FLASH_ONE_WGMMA_SPANS_N);
  // dQ: A = dS from shared memory, queries contiguous (MN-major), B = K read
  // MN-major; warpgroup w computes columns [w D / 2, (w + 1) D / 2).
  using MmaDq = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<Element, Element, float,
                                 cute::Shape<BlockM, HalfHeadDim, BlockN>,
                                 cute::GMMA::Major::MN,
                                 cute::GMMA::Major::MN>(),
      cute::Layout<cute::Shape<cute::_1, cute::_2, cute::_1>>{}));
  static_assert(wgmma_n<MmaDq>() == kHeadDim / 2,
                JAX_FLASH_ONE_WGMMA_SPANS_N);

  // The swizzle atoms of the tiles whose rows are D elements (Q, dO, K,
  // V): the widest (64, 32 or 16 columns: 128-, 64- or 32-byte swizzle)
  // that divides D and that the wgmma reading the tile as its MN-major B
  // operand, n columns at a time, can take: n must span whole atoms or lie
  // within one. Q and dO are read so by dV and dK (n = D, or D / 2 split-D),
  // K by dQ (n = D / 2). The widest that divides D serves every head dim but
  // D = 96 (dQ's n = 48: 32-byte atoms for K and V) and D = 192 (n = 96
  // split-D: 64-byte atoms throughout).
  static constexpr int atom_columns(int n) {
    for (int w = 64; w >= 16; w /= 2) {
      if (kHeadDim % w == 0 && (n % w == 0 || w % n == 0)) return w;
    }
    return 8;
  }
  template <int kColumns>
  using SmemAtomRowsOfD = std::conditional_t<
      kColumns == 64, cute::GMMA::Layout_K_SW128_Atom<Element>,
      std::conditional_t<
          kColumns == 32, cute::GMMA::Layout_K_SW64_Atom<Element>,
          std::conditional_t<kColumns == 16,
                             cute::GMMA::Layout_K_SW32_Atom<Element>,
                             cute::GMMA::Layout_K_INTER_Atom<Element>>>>;

  // Q and dO: (kBlockM, D, stage), rows of D elements.
  using SmemAtomQ =
      SmemAtomRowsOfD<atom_columns(kSplitD ? kHeadDim / 2 : kHeadDim)>;
  using SmemLayoutQ = decltype(cute::tile_to_shape(
      SmemAtomQ{}, cute::Shape<BlockM, HeadDim, cute::Int<kStages>>{}));
  // The same bytes as (D, kBlockM, stage): the B operand of dV and dK.
  using SmemLayoutQt = decltype(cute::composition(
      SmemLayoutQ{},
      cute::make_ordered_layout(
          cute::Shape<HeadDim, BlockM, cute::Int<kStages>>{},
          cute::Step<cute::_2, cute::_1, cute::_3>{})));
  // K and V: (kBlockN, D), loaded once.
  using SmemAtomK = SmemAtomRowsOfD<atom_columns(kHeadDim / 2)>;
  using SmemLayoutK =
      decltype(cute::tile_to_shape(SmemAtomK{}, cute::Shape<BlockN, HeadDim>{}));
  // K as (D, kBlockN): the B operand of dQ.
  using SmemLayoutKt = decltype(cute::composition(
      SmemLayoutK{},
      cute::make_ordered_layout(cute::Shape<HeadDim, BlockN>{},
                                cute::Step<cute::_2, cute::_1>{})));
  // dS: (kBlockM queries, kBlockN keys, buffer), queries contiguous: the A
  // operand of dQ. Two buffers: one warpgroup may write step t + 1's while
  // the other still multiplies step t's. Split-D: buffer 0 holds P^T and
  // buffer 1 dS^T of the step, both whole (the warpgroups' query halves).
  using SmemAtomDs = decltype(
      cutlass::gemm::collective::detail::ss_smem_selector<
          cute::GMMA::Major::MN, Element, BlockM, BlockN>());
  using SmemLayoutDs = decltype(cute::tile_to_shape(
      SmemAtomDs{}, cute::Shape<BlockM, BlockN, cute::_2>{},
      cute::Step<cute::_2, cute::_1, cute::_3>{}));
  // dS as (kBlockN keys, kBlockM queries, buffer): as MmaSdP's C lays it out.
  using SmemLayoutDsT = decltype(cute::composition(
      SmemLayoutDs{},
      cute::make_ordered_layout(cute::Shape<BlockN, BlockM, cute::_2>{},
                                cute::Step<cute::_2, cute::_1, cute::_3>{})));
  static constexpr uint32_t kDsBufferBytes =
      kBlockM * kBlockN * static_cast<uint32_t>(sizeof(T));
  static_assert(cute::cosize_v<SmemLayoutDs> * sizeof(T) ==
                    2 * kDsBufferBytes,
                "two dense dS buffers");

  // dS^T as consumer thread `tid` stores it: the same (key, query)
  // positions as its MmaSdP accumulator. In SmemLayoutDs each key is one
  // 128-byte row of 64 queries (the swizzle atom's row), swizzled by XOR of
  // the key's low 3 bits into bits 4-6 of the byte offset. The thread's keys
  // are k0 and k0 + 8 (k0 = its accumulator row), its queries
  // 8 j + 2 (lane % 4) + {0, 1} for j < 8: the swizzle term is the same
  // (k0 % 8 = lane / 4) for all, so the pair j of key row r lies at
  // ds_store_offset(base, r, j) = (base + 1024 r) ^ (16 j), with base the
  // swizzled offset of (k0, 2 (lane % 4)). A 64-bit swizzle per store
  // otherwise costs about six instructions. Byte offsets from the start of
  // buffer 0; tests/csrc/check_bwd_layouts.cu checks both against cute's
  // layout for every thread.
  static __host__ __device__ constexpr uint32_t ds_store_base(int tid) {
    const int lane = tid % 32, k0 = (tid / 32) * 16 + lane / 4;
    return static_cast<uint32_t>((k0 * 128 + 4 * (lane % 4)) ^
                                 ((k0 % 8) << 4));
  }
  static __host__ __device__ constexpr uint32_t ds_store_offset(uint32_t base,
                                                                int r,
                                                                int pair) {
    return (base + 1024u * r) ^ (16u * pair);
  }

  // dQ of a step in float32, in the tile order of bwd_dq_tile.h (one
  // contiguous half per consumer warpgroup, added to the workspace by one
  // bulk reduction each).
  static_assert(kBlockM == kDqTileRows && kHeadDim % 16 == 0,
                "bwd_dq_tile.h: 64-row tiles, 8-column groups per half");

  using GmemShape = cute::Shape<int32_t, int32_t, int32_t, int32_t>;
  using GmemStride = cute::Stride<int64_t, cute::_1, int64_t, int64_t>;
  using TmaQ = decltype(cute::make_tma_copy(
      cute::SM90_TMA_LOAD{},
      cute::make_tensor(cute::make_gmem_ptr(static_cast<const Element*>(nullptr)),
                        GmemShape{}, GmemStride{}),
      cute::take<0, 2>(SmemLayoutQ{}), cute::Shape<BlockM, HeadDim>{},
      cute::_1{}));
  using TmaK = decltype(cute::make_tma_copy(
      cute::SM90_TMA_LOAD{},
      cute::make_tensor(cute::make_gmem_ptr(static_cast<const Element*>(nullptr)),
                        GmemShape{}, GmemStride{}),
      SmemLayoutK{}, cute::Shape<BlockN, HeadDim>{}, cute::_1{}));

  using Pipeline = cutlass::PipelineTmaAsync<kStages>;
  static constexpr uint32_t kQTileBytes =
      kBlockM * kHeadDim * static_cast<uint32_t>(sizeof(T));
  // Per query row of a step: (lse * log2 e, delta), from the preprocess.
  static constexpr uint32_t kStatsBytes = kBlockM * 8;
  static constexpr uint32_t kStepBytes = 2 * kQTileBytes + kStatsBytes;
  static constexpr uint32_t kKTileBytes =
      kBlockN * kHeadDim * static_cast<uint32_t>(sizeof(T));

  struct SharedStorage {
    alignas(1024) cute::array_aligned<Element, cute::cosize_v<SmemLayoutK>> k;
    alignas(1024) cute::array_aligned<Element, cute::cosize_v<SmemLayoutK>> v;
    alignas(1024) cute::array_aligned<Element, cute::cosize_v<SmemLayoutQ>> q;
    alignas(1024) cute::array_aligned<Element, cute::cosize_v<SmemLayoutQ>> dout;
    alignas(1024) cute::array_aligned<Element, cute::cosize_v<SmemLayoutDs>> ds;
    alignas(128) float dq[kBlockM * kHeadDim];
    alignas(16) float2 stats[kStages][kBlockM];
    // Deterministic dalibi: per step parity, warp (8) and query column,
    // (sum P dP |d|, sum P |d|, sum P dP) over the warp's keys; and their
    // sum over the warps per query row, which the dQ writer adds to
    // dalibi_rows with one bulk reduction.
    alignas(16) float4 alibi[2][8][kBlockM];
    alignas(16) float4 alibi_rows[kBlockM];
    int kv_segment[kBlockN];
    typename Pipeline::SharedStorage pipeline_q;
    cutlass::arch::ClusterTransactionBarrier kv_full;
  };
  static constexpr int kSmemBytes = static_cast<int>(sizeof(SharedStorage));
  static_assert(kSmemBytes <= kSm90SmemPerBlock, "fits an sm90 SM");
};

}  // namespace sm90
}  // namespace jax_flash
