// Host side of the decoding kernel's tensor copies: encodes the tensor maps
// of a contiguous or paged K/V cache (common/kv_cache_tensor_map.h).
#pragma once

#include <cuda.h>
#include <cutlass/cuda_host_adapter.hpp>

#include <cstdint>

#include "common/decode_params.h"
#include "common/kv_cache_tensor_map.h"

namespace jax_flash {

// Fills p->maps and sets p->use_tensor_maps for the cache of `p` (16-bit
// elements, bf16 or fp16) on sm_90 and later; leaves use_tensor_maps false,
// so that the kernel loads another way, where the copy engine cannot take
// the cache: a head dim that is not a multiple of 64, a paged cache whose
// block size is not a power of two, addresses or strides that are not
// multiples of 16 bytes, fewer keys than one box, or an encoding the driver
// refuses.
//
// Contiguous (B, S_max, Hkv, D): dimensions 64 columns | S_max keys | D / 64
// column blocks | Hkv | B, box 64 x 64 x D / 64 x 1 x 1 (a whole tile).
// Paged (num_blocks, block_size, Hkv, D): 64 columns | block_size keys |
// D / 64 | Hkv | num_blocks, box 64 x 64 x D / 64 for blocks of 64 keys or
// more, else 64 x block_size x 1 (a block's keys, 64 columns at a time).
//
// No L2 promotion: a box brings each key's first 128 bytes for all its
// keys, then the next 128, and with 256-byte promotion every first read
// fetched the second half as well, a box ahead of its use. Without it (or
// with 128-byte promotion, which measured the same) the decoding kernel
// read the cache 3-11% faster on an H200 (B = 4, 32 query over 8 K/V
// heads, D = 128; Sq = 1: 3768 to 4113 GB/s at 32k keys, 4076 to 4490 at
// 128k; paged caches +3-8%; docs/performance.md).
inline void make_kv_cache_tensor_maps(DecodeParams* p, bool is_bf16) {
  p->use_tensor_maps = false;
  if (p->arch < 90 || p->head_dim % 64 != 0) return;
  const bool paged = p->block_table != nullptr;
  // block_size_log2 is -1 for a block size that is not a power of two.
  if (paged && p->block_size_log2 < 4) return;
  if (!paged && p->capacity < kDecodeTensorBoxRows) return;
  constexpr int64_t kBytes = 2;
  const int64_t strides[4] = {p->kv_row_stride * kBytes, 128,
                              p->kv_head_stride * kBytes,
                              p->kv_batch_stride * kBytes};
  for (const int64_t stride : strides) {
    if (stride <= 0 || stride % 16 != 0 || stride >= (int64_t{1} << 40)) {
      return;
    }
  }
  const int64_t keys = paged ? p->block_size : p->capacity;
  const int64_t outer = paged ? p->num_blocks : p->batch;
  if (outer <= 0) return;
  const cuuint64_t dims[5] = {64, static_cast<cuuint64_t>(keys),
                              static_cast<cuuint64_t>(p->head_dim / 64),
                              static_cast<cuuint64_t>(p->num_heads_kv),
                              static_cast<cuuint64_t>(outer)};
  const cuuint64_t byte_strides[4] = {
      static_cast<cuuint64_t>(strides[0]), static_cast<cuuint64_t>(strides[1]),
      static_cast<cuuint64_t>(strides[2]), static_cast<cuuint64_t>(strides[3])};
  const bool whole_tiles = !paged || p->block_size >= kDecodeTensorBoxRows;
  const cuuint32_t box[5] = {
      64,
      static_cast<cuuint32_t>(whole_tiles ? kDecodeTensorBoxRows
                                          : p->block_size),
      static_cast<cuuint32_t>(whole_tiles ? p->head_dim / 64 : 1), 1, 1};
  const cuuint32_t element_strides[5] = {1, 1, 1, 1, 1};
  const CUtensorMapDataType type = is_bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
                                           : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  auto encode = [&](const void* base, CUtensorMap* map) {
    if (reinterpret_cast<uintptr_t>(base) % 16 != 0) return false;
    const CUresult result = cutlass::call_cuTensorMapEncodeTiled(
        map, type, 5, const_cast<void*>(base), dims, byte_strides, box,
        element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
        CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_NONE,
        CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    return result == CUDA_SUCCESS;
  };
  p->use_tensor_maps = encode(p->k, &p->maps.k) && encode(p->v, &p->maps.v);
}

}  // namespace jax_flash
