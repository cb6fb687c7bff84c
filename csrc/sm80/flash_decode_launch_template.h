// Launches the decoding kernels for one (dtype, head dim). Instantiated once
// per pair by the files build/generate_kernels.py writes.
#pragma once

#include <cuda_runtime.h>

#include "common/decode_params.h"
#include "common/utils.h"
#include "sm80/decode_tile_size.h"
#include "sm80/flash_decode_kernel.h"

namespace jax_flash {

// 0 after launching the split-KV kernel (and the combine, with several
// splits), or the shared memory it needs if the device has less.
template <typename T, int kHeadDim, int kKeyWarps>
int launch_decode(const DecodeParams& p, cudaStream_t stream) {
  using Traits = DecodeTraits<T, kHeadDim, kKeyWarps>;
  constexpr int kSmem = Traits::kSmemBytes;
  if (kSmem > p.max_smem_per_block) return kSmem;
  // Bulk copies for a paged cache (on sm_90; the same code as cp.async on
  // sm_80): each key row is its own copy there anyway.
  auto kernel = p.block_table != nullptr ? &flash_decode_kernel<Traits, true>
                                         : &flash_decode_kernel<Traits, false>;
  // Above 48 KB of dynamic shared memory a kernel must opt in; the
  // attribute is per device, so it is set at every launch.
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                       kSmem);
  const int rows = p.num_heads / p.num_heads_kv * p.seqlen_q;
  const dim3 grid(p.num_splits, ceil_div(rows, Traits::kRows),
                  p.batch * p.num_heads_kv);
  kernel<<<grid, Traits::kNThreads, kSmem, stream>>>(p);
  if (p.num_splits > 1) {
    const int64_t out_rows =
        static_cast<int64_t>(p.batch) * p.num_heads * p.seqlen_q;
    flash_decode_combine_kernel<T, kHeadDim>
        <<<static_cast<unsigned>((out_rows + 3) / 4), 128, 0, stream>>>(p);
  }
  return 0;
}

// Computes out and lse of a few query rows against a K/V cache (see
// decode_params.h), choosing how the CTA's warps share the work from the
// (H / Hkv) * Sq rows of one K/V head (decode_rows_per_cta). The caller
// checks cudaGetLastError() afterwards.
template <typename T, int kHeadDim>
int run_mha_decode_sm80(const DecodeParams& p, cudaStream_t stream) {
  const int rows = p.num_heads / p.num_heads_kv * p.seqlen_q;
  switch (decode_rows_per_cta(rows)) {
    case 16:
      return launch_decode<T, kHeadDim, 4>(p, stream);
    case 32:
      return launch_decode<T, kHeadDim, 2>(p, stream);
    default:
      return launch_decode<T, kHeadDim, 1>(p, stream);
  }
}

}  // namespace jax_flash
