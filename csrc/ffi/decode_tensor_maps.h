// Host side of the decoding kernel's tensor copies: encodes the tensor maps
// of a contiguous K/V cache (layout in common/kv_cache_tensor_map.h).
#pragma once

#include <cuda.h>
#include <cutlass/cuda_host_adapter.hpp>

#include <cstdint>

#include "common/decode_params.h"
#include "common/kv_cache_tensor_map.h"

namespace jax_flash {

// Fills p->maps and sets p->use_tensor_maps for the contiguous cache of
// `p` (16-bit elements, bf16 or fp16) on sm_90 and later; leaves
// use_tensor_maps false, so that the kernel loads by cp.async, where the
// copy engine cannot take the cache: a paged cache, a head dim that is not
// a multiple of 64, addresses or strides that are not multiples of 16
// bytes, fewer keys than one box, or an encoding the driver refuses.
inline void make_kv_cache_tensor_maps(DecodeParams* p, bool is_bf16) {
  p->use_tensor_maps = false;
  if (p->arch < 90 || p->block_table != nullptr) return;
  if (p->head_dim % 64 != 0 || p->capacity < kDecodeTensorBoxRows) return;
  constexpr int64_t kBytes = 2;
  const int64_t strides[4] = {p->kv_row_stride * kBytes, 128,
                              p->kv_head_stride * kBytes,
                              p->kv_batch_stride * kBytes};
  for (const int64_t stride : strides) {
    if (stride <= 0 || stride % 16 != 0 || stride >= (int64_t{1} << 40)) {
      return;
    }
  }
  const cuuint64_t dims[5] = {64, static_cast<cuuint64_t>(p->capacity),
                              static_cast<cuuint64_t>(p->head_dim / 64),
                              static_cast<cuuint64_t>(p->num_heads_kv),
                              static_cast<cuuint64_t>(p->batch)};
  const cuuint64_t byte_strides[4] = {
      static_cast<cuuint64_t>(strides[0]), static_cast<cuuint64_t>(strides[1]),
      static_cast<cuuint64_t>(strides[2]), static_cast<cuuint64_t>(strides[3])};
  const cuuint32_t box[5] = {64, kDecodeTensorBoxRows,
                             static_cast<cuuint32_t>(p->head_dim / 64), 1, 1};
  const cuuint32_t element_strides[5] = {1, 1, 1, 1, 1};
  const CUtensorMapDataType type = is_bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
                                           : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  auto encode = [&](const void* base, CUtensorMap* map) {
    if (reinterpret_cast<uintptr_t>(base) % 16 != 0) return false;
    const CUresult result = cutlass::call_cuTensorMapEncodeTiled(
        map, type, 5, const_cast<void*>(base), dims, byte_strides, box,
        element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
        CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
        CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    return result == CUDA_SUCCESS;
  };
  p->use_tensor_maps = encode(p->k, &p->maps.k) && encode(p->v, &p->maps.v);
}

}  // namespace jax_flash
