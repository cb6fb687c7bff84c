// Launches the sm90 forward kernel for one (dtype, head dim): builds the TMA
// descriptors of q, k and v from FwdParams, zeroes the tile counter of the
// persistent grid and picks the score-modifier variant. Instantiated once
// per pair by the files build/generate_kernels.py writes (compiled for
// sm_90a only).
#pragma once

#include <cuda_runtime.h>

#include <cute/tensor.hpp>

#include "common/flash.h"
#include "sm90/flash_fwd_kernel.h"
#include "sm90/flash_fwd_kernel_traits.h"
#include "sm90/fwd_tile.h"
#include "common/utils.h"

namespace jax_flash {
namespace sm90 {

// A (S, D, heads, B) view of a (B, S, heads, D) tensor with these strides,
// D contiguous, as the TMA descriptors see it.
template <typename T>
auto gmem_tensor(const void* data, int seqlen, int heads, int head_dim,
                 int batch, int64_t row_stride, int64_t head_stride,
                 int64_t batch_stride) {
  using namespace cute;
  return make_tensor(
      make_gmem_ptr(static_cast<const T*>(data)),
      make_layout(make_shape(seqlen, head_dim, heads, batch),
                  make_stride(row_stride, _1{}, head_stride, batch_stride)));
}

template <typename Traits>
FwdKernelParams<Traits> make_kernel_params(const FwdParams& p) {
  using namespace cute;
  using Element = typename Traits::Element;
  using TileQ = Shape<Int<Traits::kBlockM>, Int<Traits::kHeadDim>>;
  using TileKV = Shape<Int<Traits::kBlockN>, Int<Traits::kHeadDim>>;
  auto q = gmem_tensor<Element>(p.q, p.seqlen_q, p.num_heads, p.head_dim, p.batch,
                          p.q_row_stride, p.q_head_stride, p.q_batch_stride);
  auto k = gmem_tensor<Element>(p.k, p.seqlen_k, p.num_heads_kv, p.head_dim,
                          p.batch, p.k_row_stride, p.k_head_stride,
                          p.k_batch_stride);
  auto v = gmem_tensor<Element>(p.v, p.seqlen_k, p.num_heads_kv, p.head_dim,
                          p.batch, p.v_row_stride, p.v_head_stride,
                          p.v_batch_stride);
  auto kv_layout = take<0, 2>(typename Traits::SmemLayoutKV{});
  return {p,
          make_tma_copy(SM90_TMA_LOAD{}, q,
                        take<0, 2>(typename Traits::SmemLayoutQ{}), TileQ{},
                        _1{}),
          make_tma_copy(SM90_TMA_LOAD{}, k, kv_layout, TileKV{}, _1{}),
          make_tma_copy(SM90_TMA_LOAD{}, v, kv_layout, TileKV{}, _1{})};
}

// The persistent grid (Traits::kPersistent): one CTA per SM (at most one
// per tile); the CTAs claim their tiles from p.tile_counter, zeroed here
// first. Otherwise one CTA per tile.
template <typename Traits, bool kScoreMod, bool kSegments>
void launch_fwd_sm90(const FwdParams& p, cudaStream_t stream) {
  auto kernel = &flash_fwd_sm90_kernel<Traits, kScoreMod, kSegments>;
  constexpr int kSmem = Traits::kSmemBytes;
  // Above 48 KB of dynamic shared memory a kernel must opt in; the
  // attribute is per device, so it is set at every launch.
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                       kSmem);
  const int64_t tiles = static_cast<int64_t>(ceil_div(p.seqlen_q,
                                                      Traits::kBlockM)) *
                        p.num_heads * p.batch;
  const int ctas = fwd_num_ctas(tiles, p.num_sms, Traits::kPersistent);
  if (Traits::kPersistent) {
    cudaMemsetAsync(p.tile_counter, 0, sizeof(int), stream);
  }
  kernel<<<ctas, Traits::kThreads, kSmem, stream>>>(
      make_kernel_params<Traits>(p));
}

// The plain variant: on fwd_plain_consumer_warpgroups(D) consumer
// warpgroups where the mask has no bound right of the diagonal (no causal
// or right window bound) or the keys are at least kFwdTallTileMinKeys, and
// the device has the shared memory for their taller Q tile; else on two.
template <typename T, int kHeadDim>
void launch_fwd_sm90_plain(const FwdParams& p, cudaStream_t stream) {
  constexpr int kWarpgroups = fwd_plain_consumer_warpgroups(kHeadDim);
  if constexpr (kWarpgroups != kFwdConsumerWarpgroups) {
    using Traits = FwdKernelTraits<T, kHeadDim, kWarpgroups>;
    if ((p.window_right < 0 || p.seqlen_k >= kFwdTallTileMinKeys) &&
        Traits::kSmemBytes <= p.max_smem_per_block) {
      launch_fwd_sm90<Traits, false, false>(p, stream);
      return;
    }
  }
  launch_fwd_sm90<FwdKernelTraits<T, kHeadDim>, false, false>(p, stream);
}

}  // namespace sm90

// Computes out and lse for q, k, v of type T and head dim kHeadDim (= Dv) on
// an sm90 GPU; returns 0 after launching, or the shared memory per block the
// kernel needs when the device offers less (launching nothing). The caller
// checks cudaGetLastError() afterwards.
template <typename T, int kHeadDim>
int run_mha_fwd_sm90(const FwdParams& p, cudaStream_t stream) {
  using Traits = sm90::FwdKernelTraits<T, kHeadDim>;
  if (Traits::kSmemBytes > p.max_smem_per_block) return Traits::kSmemBytes;
  // The plain path keeps raw scores and folds a positive scale into exp2;
  // anything else computes each logit explicitly. Segment ids have a
  // variant of their own on the plain path; the score-modifier variant
  // tests for them per tile.
  const bool score_mod = p.softcap > 0.f || p.alibi_slopes != nullptr ||
                         !(p.softmax_scale > 0.f);
  if (score_mod) {
    sm90::launch_fwd_sm90<Traits, true, true>(p, stream);
  } else if (p.q_segment_ids != nullptr) {
    sm90::launch_fwd_sm90<Traits, false, true>(p, stream);
  } else {
    sm90::launch_fwd_sm90_plain<T, kHeadDim>(p, stream);
  }
  return 0;
}

}  // namespace jax_flash
