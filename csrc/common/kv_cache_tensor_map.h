// Tensor maps (TMA descriptors) of a K/V cache for the decoding kernel's
// tensor copies on sm_90: a copy brings keys of one K/V head into shared
// memory with 128-byte swizzling (the layout Swizzled128Tile in
// sm80/warp_mma.h reads), the columns in blocks of 64 (128 bytes), one
// kDecodeTensorBoxRows-row block after another.
//
// A contiguous cache (B, S_max, Hkv, D) is described to the copy engine as
// five dimensions, innermost first: 64 columns | S_max keys | D / 64 column
// blocks | Hkv heads | B rows, and one copy brings a whole tile (box 64 x
// kDecodeTensorBoxRows x D / 64 x 1 x 1); keys past S_max come in as
// zeros. A paged cache (num_blocks, block_size, Hkv, D) is the same with
// block_size keys and num_blocks in place of S_max and B; blocks of fewer
// than kDecodeTensorBoxRows keys come in one 64-column block at a time
// (ffi/decode_tensor_maps.h encodes both).
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
