// Launches the sm80 forward kernel for one (dtype, head dim): the
// run_mha_fwd_<80, T, D> of each file build/generate_kernels.py writes calls
// run_mha_fwd_sm80<T, D>.
#pragma once

#include <cuda_runtime.h>

#include "common/flash.h"
#include "common/utils.h"
#include "sm80/flash_fwd_kernel.h"
#include "sm80/tile_size.h"

namespace jax_flash {

template <typename Traits, bool kScoreMod>
void launch_fwd(const FwdParams& p, cudaStream_t stream) {
  auto kernel = &flash_fwd_kernel<Traits, kScoreMod>;
  constexpr int kSmem = Traits::kSmemBytes;
  // Above 48 KB of dynamic shared memory a kernel must opt in. The attribute
  // is per device, so it is set at every launch (it costs no stream work).
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                       kSmem);
  const dim3 grid(ceil_div(p.seqlen_q, Traits::kBlockM), p.num_heads,
                  p.batch);
  kernel<<<grid, Traits::kNThreads, kSmem, stream>>>(p);
}

// The forward's traits for (T, head dim) with kStages K/V buffers.
template <typename T, int kHeadDim, int kStages>
using FwdTraitsFor =
    FwdKernelTraits<T, kHeadDim, fwd_block_m(kHeadDim), fwd_block_n(kHeadDim),
                    fwd_num_warps(kHeadDim), kStages>;

// 0 after launching, or the shared memory Traits needs if the device has
// less.
template <typename Traits>
int run_fwd_with(const FwdParams& p, cudaStream_t stream) {
  if (Traits::kSmemBytes > p.max_smem_per_block) return Traits::kSmemBytes;
  // The plain path keeps raw scores and folds a positive scale into exp2;
  // anything else takes the path that computes each logit explicitly.
  const bool score_mod = p.softcap > 0.f || p.alibi_slopes != nullptr ||
                         !(p.softmax_scale > 0.f);
  if (score_mod) {
    launch_fwd<Traits, true>(p, stream);
  } else {
    launch_fwd<Traits, false>(p, stream);
  }
  return 0;
}

// Computes out and lse for q, k, v of type T and head dim kHeadDim (= Dv),
// returning as run_fwd_with: K/V double-buffered where the device has the
// shared memory, else single (compiled only for head dims whose
// double-buffered kernel exceeds an A100's). The caller checks
// cudaGetLastError() afterwards.
template <typename T, int kHeadDim>
int run_mha_fwd_sm80(const FwdParams& p, cudaStream_t stream) {
  using TwoStages = FwdTraitsFor<T, kHeadDim, 2>;
  if constexpr (TwoStages::kSmemBytes > kSm80SmemPerBlock) {
    if (TwoStages::kSmemBytes > p.max_smem_per_block) {
      return run_fwd_with<FwdTraitsFor<T, kHeadDim, 1>>(p, stream);
    }
  }
  return run_fwd_with<TwoStages>(p, stream);
}

}  // namespace jax_flash
