// Types of the sm90 forward kernel for one (dtype, head dim): tile shape,
// shared-memory layouts (swizzled for wgmma and TMA), the two tiled wgmma
// operations, the TMA copies and the shared storage.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/numeric_types.h>
#include <cutlass/gemm/collective/builders/sm90_common.inl>
#include <cutlass/pipeline/pipeline.hpp>

#include "sm90/tile_size.h"
#include "sm90/wgmma_shape.h"

namespace jax_flash {
namespace sm90 {

// kConsumerWarpgroups_: 64 query rows each (the plain variant's launch may
// take fwd_plain_consumer_warpgroups(D)).
template <typename T_, int kHeadDim_,
          int kConsumerWarpgroups_ = kFwdConsumerWarpgroups>
struct FwdKernelTraits {
  using T = T_;  // __nv_bfloat16 or __half, as the FFI handlers name it
  // The same type as CuTe's GMMA and TMA atoms name it.
  using Element = std::conditional_t<std::is_same_v<T, __nv_bfloat16>,
                                     cutlass::bfloat16_t, cutlass::half_t>;
  static_assert(sizeof(Element) == sizeof(T), "same 16-bit storage");
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kConsumerWarpgroups = kConsumerWarpgroups_;
  static constexpr int kBlockM = 64 * kConsumerWarpgroups;
  static constexpr int kBlockN = fwd_block_n(kHeadDim);
  static constexpr int kStages = fwd_stages(kHeadDim);
  static constexpr bool kPingPong = fwd_ping_pong(kHeadDim);
  static constexpr bool kPersistent = fwd_persistent(kHeadDim);
  static constexpr int kQStages = fwd_q_stages(kHeadDim);
  // Query tiles start at seqlen_q - num_m_blocks * kBlockM (< 0: the first
  // tile is the partial one) rather than at 0, for 192-row tiles: sequence
  // lengths are mostly multiples of 128 but not of 192, and under a causal
  // mask the first rows see the fewest keys, so their padding costs least.
  static constexpr bool kPadFirstTile = kBlockM % 128 != 0;
  static constexpr int kConsumerThreads = kConsumerWarpgroups * 128;
  static constexpr int kThreads = fwd_threads(kConsumerWarpgroups);
  static constexpr int kProducerRegisters =
      fwd_producer_registers(kConsumerWarpgroups);
  static constexpr int kConsumerRegisters =
      fwd_consumer_registers(kConsumerWarpgroups);
  static_assert(kHeadDim % 16 == 0 && kBlockN % 16 == 0, "k16 steps");

  using TileShape = cute::Shape<cute::Int<kBlockM>, cute::Int<kBlockN>,
                                cute::Int<kHeadDim>>;
  // The consumer warpgroups stack along M.
  using AtomLayout =
      cute::Layout<cute::Shape<cute::Int<kConsumerWarpgroups>, cute::_1,
                               cute::_1>>;

  // S = Q K^T: both operands from shared memory, K-major (D contiguous),
  // one wgmma of N = kBlockN per k step.
  using MmaS = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<Element, Element, float, TileShape>(),
      AtomLayout{}));
  static_assert(wgmma_n<MmaS>() == kBlockN, JAX_FLASH_ONE_WGMMA_SPANS_N);
  // O += P V: P from registers (the converted score accumulator), V from
  // shared memory read MN-major (its D is contiguous, and D is O's N).
  using MmaO = decltype(cute::make_tiled_mma(
      cute::GMMA::rs_op_selector<Element, Element, float,
                                 cute::Shape<cute::Int<kBlockM>,
                                             cute::Int<kHeadDim>,
                                             cute::Int<kBlockN>>,
                                 cute::GMMA::Major::K,
                                 cute::GMMA::Major::MN>(),
      AtomLayout{}));
  static_assert(wgmma_n<MmaO>() == kHeadDim, JAX_FLASH_ONE_WGMMA_SPANS_N);

  // Shared memory: rows of D elements in the widest swizzle that divides D.
  using SmemAtomQ = decltype(
      cutlass::gemm::collective::detail::ss_smem_selector<
          cute::GMMA::Major::K, Element, cute::Int<kBlockM>, cute::Int<kHeadDim>>());
  // (kBlockM, D, Q stage).
  using SmemLayoutQ = decltype(cute::tile_to_shape(
      SmemAtomQ{}, cute::Shape<cute::Int<kBlockM>, cute::Int<kHeadDim>,
                               cute::Int<kQStages>>{}));
  using SmemAtomKV = decltype(
      cutlass::gemm::collective::detail::ss_smem_selector<
          cute::GMMA::Major::K, Element, cute::Int<kBlockN>, cute::Int<kHeadDim>>());
  // (kBlockN, D, stage) for K and V alike.
  using SmemLayoutKV = decltype(cute::tile_to_shape(
      SmemAtomKV{},
      cute::Shape<cute::Int<kBlockN>, cute::Int<kHeadDim>,
                  cute::Int<kStages>>{}));
  // V seen as O's B operand: (D, kBlockN, stage), the same bytes.
  using SmemLayoutVt = decltype(cute::composition(
      SmemLayoutKV{},
      cute::make_ordered_layout(
          cute::Shape<cute::Int<kHeadDim>, cute::Int<kBlockN>,
                      cute::Int<kStages>>{},
          cute::Step<cute::_2, cute::_1, cute::_3>{})));

  // Global tensors as TMA sees them: (S, D, heads, B), D contiguous.
  using GmemShape = cute::Shape<int32_t, int32_t, int32_t, int32_t>;
  using GmemStride = cute::Stride<int64_t, cute::_1, int64_t, int64_t>;
  using GmemLayout = cute::Layout<GmemShape, GmemStride>;
  using TmaQ = decltype(cute::make_tma_copy(
      cute::SM90_TMA_LOAD{},
      cute::make_tensor(cute::make_gmem_ptr(static_cast<const Element*>(nullptr)),
                        GmemShape{}, GmemStride{}),
      cute::take<0, 2>(SmemLayoutQ{}),
      cute::Shape<cute::Int<kBlockM>, cute::Int<kHeadDim>>{}, cute::_1{}));
  using TmaKV = decltype(cute::make_tma_copy(
      cute::SM90_TMA_LOAD{},
      cute::make_tensor(cute::make_gmem_ptr(static_cast<const Element*>(nullptr)),
                        GmemShape{}, GmemStride{}),
      cute::take<0, 2>(SmemLayoutKV{}),
      cute::Shape<cute::Int<kBlockN>, cute::Int<kHeadDim>>{}, cute::_1{}));

  using Pipeline = cutlass::PipelineTmaAsync<kStages>;
  static constexpr uint32_t kQBytes =
      kBlockM * kHeadDim * static_cast<uint32_t>(sizeof(T));
  static constexpr uint32_t kKVTileBytes =
      kBlockN * kHeadDim * static_cast<uint32_t>(sizeof(T));

  struct SharedStorage {
    // 128-byte swizzles repeat every 1024 bytes: align each buffer to it.
    alignas(1024) cute::array_aligned<Element, cute::cosize_v<SmemLayoutQ>> q;
    alignas(1024) cute::array_aligned<Element, cute::cosize_v<SmemLayoutKV>> k;
    alignas(1024) cute::array_aligned<Element, cute::cosize_v<SmemLayoutKV>> v;
    typename Pipeline::SharedStorage pipeline_k;
    typename Pipeline::SharedStorage pipeline_v;
    // Per Q stage: its Q tile has landed (with the tile's index, below).
    cutlass::arch::ClusterTransactionBarrier q_full[kQStages];
    // Per Q stage: the consumers are done with its Q and index, so a later
    // tile may take the stage.
    cutlass::arch::ClusterBarrier q_empty[kQStages];
    int tile[kQStages];  // work tile index of each stage's Q, or kNoTile
  };
  static constexpr int kSmemBytes = static_cast<int>(sizeof(SharedStorage));
};

}  // namespace sm90
}  // namespace jax_flash
