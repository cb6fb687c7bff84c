// Launches the three backward kernels for one (dtype, head dim):
// preprocess (delta, zeroed scratch), the main kernel (dK, dV, dQ partials,
// dalibi partials), convert (dQ to T, dalibi). The run_mha_bwd_<80, T, D> of
// each file build/generate_kernels.py writes calls run_mha_bwd_sm80<T, D>.
#pragma once

#include <cuda_runtime.h>

#include "common/flash.h"
#include "common/utils.h"
#include "sm80/flash_bwd_convert.h"
#include "sm80/flash_bwd_kernel.h"
#include "sm80/flash_bwd_preprocess.h"

namespace jax_flash {

template <typename Traits, bool kScoreMod>
void launch_bwd_main(const BwdParams& p, const BwdScratch& scratch,
                     int num_n_blocks, cudaStream_t stream) {
  // Key tiles vary fastest by default: CTAs running side by side read the
  // same heads' Q and dO (L2 reuse). Under a causal (or right-window) mask
  // the low key tiles see the most query tiles; when the grid is short
  // (under 4 CTAs per SM, e.g. GQA, whose CTAs loop over the group's heads)
  // key tiles vary slowest instead, so the longest CTAs start first and the
  // short ones fill the tail (causal GQA 8:1 backward at S = 1k / 4k went
  // from 0.61 / 0.54x to 0.82 / 0.77x of FlashAttention-2; MHA grids, with 8
  // to 16 CTAs per SM, gain nothing: docs/performance.md). Either way, in
  // deterministic mode the key tiles run in reverse (common/dq_order.h): the
  // CTA of key tile n waits only for higher tiles of the same (b, h), which
  // started earlier.
  const bool tiles_slowest =
      p.window_right >= 0 &&
      static_cast<int64_t>(p.batch) * p.num_heads_kv * num_n_blocks <
          4 * static_cast<int64_t>(p.num_sms);
  auto kernel = tiles_slowest ? &flash_bwd_kernel<Traits, kScoreMod, true>
                              : &flash_bwd_kernel<Traits, kScoreMod, false>;
  const dim3 grid = tiles_slowest
      ? dim3(p.batch, p.num_heads_kv, num_n_blocks)
      : dim3(num_n_blocks, p.batch, p.num_heads_kv);
  const int smem_bytes = scratch.dq_staged ? Traits::kSmemBytesStagedDq
                                           : Traits::kSmemBytes;
  // Opt in above 48 KB of dynamic shared memory (no stream work).
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                       smem_bytes);
  kernel<<<grid, Traits::kThreads, smem_bytes, stream>>>(p, scratch);
}

// Computes dq, dk, dv (and dalibi) with the kernels of Traits;
// p.workspace holds jax_flash_bwd_workspace_bytes(...) bytes. Returns 0 after
// launching (stopping at the first launch that fails; the caller checks
// cudaGetLastError()), or launching nothing, the shared memory Traits needs
// when the device offers less.
template <typename Traits>
int run_bwd_with(const BwdParams& p, cudaStream_t stream) {
  if (Traits::kSmemBytes > p.max_smem_per_block) return Traits::kSmemBytes;
  using T = typename Traits::T;
  constexpr int kHeadDim = Traits::kHeadDim;
  BwdScratch scratch = BwdScratch::make(p);
  // sm90 adds dQ with the bulk-copy engine where its staging tile fits
  // (not in deterministic mode, whose order the semaphores fix per atomic).
  scratch.dq_staged = Traits::kCanStageDq && p.arch >= 90 &&
                      !p.deterministic &&
                      Traits::kSmemBytesStagedDq <= p.max_smem_per_block;
  const int num_m_blocks = ceil_div(p.seqlen_q, Traits::kBlockM);
  const int num_n_blocks = ceil_div(p.seqlen_k, Traits::kBlockN);
  const dim3 row_grid(num_m_blocks, p.batch, p.num_heads);

  bwd_preprocess_kernel<T, kHeadDim, Traits::kBlockM>
      <<<row_grid, 256, 0, stream>>>(p, scratch);
  if (cudaPeekAtLastError() != cudaSuccess) return 0;

  if (num_n_blocks > 0) {  // else no key: dK, dV are empty and dQ is 0
    // Softcap and alibi take the path that computes each logit explicitly.
    if (p.softcap > 0.f || p.alibi_slopes != nullptr) {
      launch_bwd_main<Traits, true>(p, scratch, num_n_blocks, stream);
    } else {
      launch_bwd_main<Traits, false>(p, scratch, num_n_blocks, stream);
    }
    if (cudaPeekAtLastError() != cudaSuccess) return 0;
  }

  bwd_convert_dq_kernel<T, kHeadDim, Traits::kBlockM>
      <<<row_grid, 256, 0, stream>>>(p, scratch);
  return 0;
}

// Two Q/dO stages where the device has the shared memory for them, else one
// (compiled only for head dims whose two-stage kernel exceeds an A100's).
template <typename T, int kHeadDim>
int run_mha_bwd_sm80(const BwdParams& p, cudaStream_t stream) {
  using TwoStages = BwdKernelTraits<T, kHeadDim, 2>;
  if constexpr (TwoStages::kSmemBytes > kSm80SmemPerBlock) {
    if (TwoStages::kSmemBytes > p.max_smem_per_block) {
      return run_bwd_with<BwdKernelTraits<T, kHeadDim, 1>>(p, stream);
    }
  }
  return run_bwd_with<TwoStages>(p, stream);
}

}  // namespace jax_flash
