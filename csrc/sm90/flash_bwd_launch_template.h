// Launches the sm90 backward for one (dtype, head dim): the preprocess
// (delta, the rows' (lse log2 e, delta) for the bulk loads, zeroed scratch;
// shared with the sm80 backward), the main kernel (flash_bwd_kernel.h) and
// the dQ/dalibi convert of dQ's tile order (flash_bwd_convert.h).
#pragma once

#include <cuda_runtime.h>

#include <cute/tensor.hpp>

#include "common/flash.h"
#include "common/utils.h"
#include "sm80/flash_bwd_preprocess.h"
#include "sm90/bwd_dq_tile.h"
#include "sm90/flash_bwd_convert.h"
#include "sm90/flash_bwd_kernel.h"
#include "sm90/flash_bwd_kernel_traits.h"
#include "sm90/flash_fwd_launch_template.h"  // gmem_tensor

namespace jax_flash {
namespace sm90 {

template <typename Traits>
BwdKernelParams<Traits> make_bwd_kernel_params(const BwdParams& p,
                                               const BwdScratch& scratch,
                                               bool dq_tiles_resident) {
  using namespace cute;
  using Element = typename Traits::Element;
  using TileQ = Shape<Int<Traits::kBlockM>, Int<Traits::kHeadDim>>;
  using TileK = Shape<Int<Traits::kBlockN>, Int<Traits::kHeadDim>>;
  auto q = gmem_tensor<Element>(p.q, p.seqlen_q, p.num_heads, p.head_dim,
                                p.batch, p.q_row_stride, p.q_head_stride,
                                p.q_batch_stride);
  auto dout = gmem_tensor<Element>(p.dout, p.seqlen_q, p.num_heads,
                                   p.head_dim, p.batch, p.dout_row_stride,
                                   p.dout_head_stride, p.dout_batch_stride);
  auto k = gmem_tensor<Element>(p.k, p.seqlen_k, p.num_heads_kv, p.head_dim,
                                p.batch, p.k_row_stride, p.k_head_stride,
                                p.k_batch_stride);
  auto v = gmem_tensor<Element>(p.v, p.seqlen_k, p.num_heads_kv, p.head_dim,
                                p.batch, p.v_row_stride, p.v_head_stride,
                                p.v_batch_stride);
  auto q_layout = take<0, 2>(typename Traits::SmemLayoutQ{});
  auto k_layout = typename Traits::SmemLayoutK{};
  return {p,
          scratch,
          make_tma_copy(SM90_TMA_LOAD{}, q, q_layout, TileQ{}, _1{}),
          make_tma_copy(SM90_TMA_LOAD{}, dout, q_layout, TileQ{}, _1{}),
          make_tma_copy(SM90_TMA_LOAD{}, k, k_layout, TileK{}, _1{}),
          make_tma_copy(SM90_TMA_LOAD{}, v, k_layout, TileK{}, _1{}),
          dq_tiles_resident};
}

template <typename Traits>
int run_bwd_sm90(const BwdParams& p, cudaStream_t stream) {
  if (Traits::kSmemBytes > p.max_smem_per_block) return Traits::kSmemBytes;
  using T = typename Traits::T;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kBlockM = Traits::kBlockM;
  static_assert(kBlockM == kDqTileRows, "dQ tiles are query tiles");
  BwdScratch scratch = BwdScratch::make(p);
  scratch.write_row_stats = true;
  scratch.dq_tiled = true;
  const int num_m_blocks = ceil_div(p.seqlen_q, kBlockM);
  const int num_n_blocks = ceil_div(p.seqlen_k, Traits::kBlockN);
  const dim3 row_grid(num_m_blocks, p.batch, p.num_heads);

  bwd_preprocess_kernel<T, kHeadDim, kBlockM>
      <<<row_grid, 256, 0, stream>>>(p, scratch);
  if (cudaPeekAtLastError() != cudaSuccess) return 0;

  if (num_n_blocks > 0) {  // else no key: dK, dV are empty and dQ is 0
    const bool score_mod = p.softcap > 0.f || p.alibi_slopes != nullptr;
    auto kernel = score_mod ? &flash_bwd_sm90_kernel<Traits, true>
                            : &flash_bwd_sm90_kernel<Traits, false>;
    constexpr int kSmem = Traits::kSmemBytes;
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                         kSmem);
    // Key tiles vary fastest: CTAs running side by side read the same
    // heads' Q and dO (L2 reuse), and under a causal mask the low key
    // tiles, which see the most queries, start first. In deterministic mode
    // (common/dq_order.h) that order needs every key tile CTA of one
    // (b, h_kv) resident at once, as CTAs wait for tiles launched after
    // them; then masks without a window take the cyclic order. The launch
    // asks for twice a group's CTAs: two such launches on two streams then
    // cannot fill the GPU with partial groups that wait on each other.
    // Otherwise the key tiles run in reverse: the CTA of key tile n waits
    // only for higher tiles of the same head, which started earlier.
    bool dq_tiles_resident = false;
    if (p.deterministic) {
      int per_sm = 0;
      if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(
              &per_sm, kernel, Traits::kThreads, kSmem) != cudaSuccess) {
        per_sm = 0;  // the reverse order, which needs no residency
        (void)cudaGetLastError();  // not the launch's error
      }
      dq_tiles_resident = 2 * num_n_blocks <= per_sm * p.num_sms;
    }
    const dim3 grid(num_n_blocks, p.num_heads_kv, p.batch);
    kernel<<<grid, Traits::kThreads, kSmem, stream>>>(
        make_bwd_kernel_params<Traits>(p, scratch, dq_tiles_resident));
    if (cudaPeekAtLastError() != cudaSuccess) return 0;
  }

  bwd_convert_dq_tiled_kernel<T, kHeadDim>
      <<<row_grid, 256, 0, stream>>>(p, scratch);
  return 0;
}

}  // namespace sm90

// Computes dq, dk, dv (and dalibi) on an sm90 GPU. Instantiated only for
// the head dims jax_flash/cuda/instantiations.py lists for (90, "bwd"); the
// others run the sm80 backward (jax_flash.cuda.library.kernel_arch).
template <typename T, int kHeadDim>
int run_mha_bwd_sm90(const BwdParams& p, cudaStream_t stream) {
  return sm90::run_bwd_sm90<sm90::BwdKernelTraits<T, kHeadDim>>(p, stream);
}

}  // namespace jax_flash
