// Tensor maps (TMA descriptors) of a contiguous K/V cache for the decoding
// kernel's tensor copies on sm_90: one copy brings kDecodeTensorBoxRows
// keys of one (batch row, K/V head), every column, into shared memory with
// 128-byte swizzling (the layout Swizzled128Tile in sm80/warp_mma.h reads).
//
// The cache (B, S_max, Hkv, D) is described to the copy engine as five
// dimensions, innermost first: 64 columns (128 bytes) | S_max keys | D / 64
// column blocks | Hkv heads | B rows. The box is 64 x kDecodeTensorBoxRows
// x D / 64 x 1 x 1, so the 64-column blocks land one after another, each
// kDecodeTensorBoxRows rows of 128 bytes, and the swizzle permutes the
// 16-byte pieces of each row by the row's index mod 8. Keys past S_max
// come in as zeros.
#pragma once

#include <cuda.h>

#include <cstdint>

namespace jax_flash {

// Keys per tensor copy: the decoding kernel's tile (kDecodeBlockN).
constexpr int kDecodeTensorBoxRows = 64;

// The descriptors of K and V, passed by value to the kernel inside its
// __grid_constant__ parameters, so that the copy engine reads them there.
struct KvCacheTensorMaps {
  CUtensorMap k;
  CUtensorMap v;
};

}  // namespace jax_flash
