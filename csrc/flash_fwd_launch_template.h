// Launches the forward kernel for one (dtype, head dim). Instantiated once per
// pair by the files build/generate_kernels.py writes.
#pragma once

#include <cuda_runtime.h>

#include "flash.h"
#include "flash_fwd_kernel.h"
#include "tile_size.h"
#include "utils.h"

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

// Computes out and lse for q, k, v of type T and head dim kHeadDim (= Dv).
// The caller checks cudaGetLastError() afterwards.
template <typename T, int kHeadDim>
void run_mha_fwd_(const FwdParams& p, cudaStream_t stream) {
  using Traits = FwdKernelTraits<T, kHeadDim, fwd_block_m(kHeadDim),
                                 fwd_block_n(kHeadDim),
                                 fwd_num_warps(kHeadDim)>;
  // The plain path keeps raw scores and folds a positive scale into exp2;
  // anything else takes the path that computes each logit explicitly.
  const bool score_mod = p.softcap > 0.f || p.alibi_slopes != nullptr ||
                         !(p.softmax_scale > 0.f);
  if (score_mod) {
    launch_fwd<Traits, true>(p, stream);
  } else {
    launch_fwd<Traits, false>(p, stream);
  }
}

}  // namespace jax_flash
