// The N of a tiled wgmma's instruction, for the traits' checks that one
// instruction spans a tile's N. CuTe's selectors pick the widest N of their
// list that divides the tile's; that list holds every multiple of 8 only under
// CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED (build/build_cuda.py's DEFINES).
// Without it they silently split a tile of N = 80, 160 or 224 into
// instructions of N = 16 or 32, each of which reads its A operand again.
#pragma once

#include <cute/atom/mma_atom.hpp>

namespace jax_flash {
namespace sm90 {

template <class TiledMma>
constexpr int wgmma_n() {
  return cute::size<1>(typename TiledMma::AtomShape_MNK{});
}

}  // namespace sm90
}  // namespace jax_flash

// The message of those checks.
#define JAX_FLASH_ONE_WGMMA_SPANS_N                                         \
  "one wgmma spans the tile's N: compile with "                             \
  "-DCUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED (build/build_cuda.py's DEFINES)"
