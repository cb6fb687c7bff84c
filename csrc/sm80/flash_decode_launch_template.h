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
  // On sm_90 the copy engine: tensor copies where the handler could encode
  // the cache's tensor maps (of whole tiles for a contiguous cache, of
  // blocks for a paged one), else bulk copies of single rows for a paged
  // cache (each row has its own address there anyway); cp.async otherwise
  // (and in device code built for sm_80).
  const bool paged = p.block_table != nullptr;
  auto kernel =
      p.use_tensor_maps
          ? (paged ? &flash_decode_kernel<Traits, DecodeLoads::kTensorBlocks>
                   : &flash_decode_kernel<Traits, DecodeLoads::kTensorTiles>)
          : (paged ? &flash_decode_kernel<Traits, DecodeLoads::kBulkRows>
                   : &flash_decode_kernel<Traits, DecodeLoads::kCpAsync>);
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
    // On sm_90 the combine is a programmatic dependent of the split kernel:
    // its CTAs launch while the split kernel's last CTAs run and wait in
    // griddepcontrol.wait, so the gap between the kernels closes. Only
    // where they were compiled for sm_90 (a library built for sm_80 alone
    // runs their PTX there, without the griddepcontrol instructions); both
    // come from this translation unit, so the combine's version tells.
    auto combine = &flash_decode_combine_kernel<T, kHeadDim>;
    static const bool has_griddepcontrol = [combine] {
      cudaFuncAttributes attributes{};
      return cudaFuncGetAttributes(&attributes, combine) == cudaSuccess &&
             attributes.ptxVersion >= 90;
    }();
    cudaLaunchAttribute attribute;
    attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attribute.val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(static_cast<unsigned>((out_rows + 3) / 4));
    config.blockDim = dim3(128);
    config.dynamicSmemBytes = 0;
    config.stream = stream;
    config.attrs = &attribute;
    config.numAttrs = p.arch >= 90 && has_griddepcontrol ? 1 : 0;
    cudaLaunchKernelEx(&config, combine, p);
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
