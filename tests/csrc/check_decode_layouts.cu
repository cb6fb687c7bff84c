// Host checks of the shared-memory layout the decoding kernel reads its K/V
// tiles in when tensor copies (TMA, 128-byte swizzle) bring them on sm_90:
// for every (row, column) of a 64-key tile at D = 64, 128 and 256,
// Swizzled128Tile::offset (sm80/warp_mma.h) equals
// - the 128-byte swizzle as the PTX ISA defines it, applied to the box the
//   tensor map of common/kv_cache_tensor_map.h describes (64 columns, then
//   64 rows, then the column blocks): byte-address bits [4, 7) XOR bits
//   [7, 10);
// - cute's K-major 128-byte-swizzle atom for 16-bit elements tiled over the
//   tile, rows first (what the sm90 kernels give their TMA copies).
// Prints the number of mismatches and exits non-zero when there is any.
#include <cstdint>
#include <cstdio>

#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>

#include "common/kv_cache_tensor_map.h"
#include "sm80/warp_mma.h"

template <int kHeadDim>
int mismatches() {
  using namespace cute;
  constexpr int kRows = jax_flash::kDecodeTensorBoxRows;
  const jax_flash::Swizzled128Tile<kRows> tile;
  // cute applies the swizzle of this layout to shared-memory addresses:
  // the offsets are read off a tensor over an aligned array.
  using Element = cutlass::bfloat16_t;
  auto cute_layout = tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{},
                                   Shape<Int<kRows>, Int<kHeadDim>>{});
  alignas(1024) static Element storage[kRows * kHeadDim];
  Tensor cute_tile = make_tensor(make_smem_ptr(storage), cute_layout);
  int bad = 0;
  for (int r = 0; r < kRows; ++r) {
    for (int c = 0; c < kHeadDim; ++c) {
      const int got = tile.offset(r, c) * 2;  // bytes
      const int dense = ((c / 64) * kRows + r) * 128 + (c % 64) * 2;
      const int ptx = dense ^ (((dense >> 7) & 7) << 4);
      const int from_cute = static_cast<int>(
          reinterpret_cast<const char*>(&cute_tile(r, c)) -
          reinterpret_cast<const char*>(storage));
      if ((got != ptx || got != from_cute) && ++bad <= 5) {
        std::printf("D %d (%d, %d): kernel %d, PTX swizzle %d, cute %d\n",
                    kHeadDim, r, c, got, ptx, from_cute);
      }
    }
  }
  std::printf("decode K/V tile D = %d: mismatches: %d\n", kHeadDim, bad);
  return bad;
}

int main() {
  const int bad = mismatches<64>() + mismatches<128>() + mismatches<256>();
  return bad == 0 ? 0 : 1;
}
