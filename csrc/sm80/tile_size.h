// Tile sizes of the sm80-style (mma.sync) kernels, as constexpr functions of
// the head dim, so that the launch templates and any future tuning share one
// table.
#pragma once

namespace jax_flash {

// Forward, query rows per CTA. 128 rows give each K/V tile loaded into shared
// memory 128 query rows of reuse; more would need more warps or registers.
constexpr int fwd_block_m(int /*head_dim*/) { return 128; }

// Forward, keys per mainloop step. 64 for every head dim: with 128, the
// score tile (32 rows x 128 keys per warp, 128 floats a thread) plus the
// output accumulator made ptxas spill even at head dim 64.
constexpr int fwd_block_n(int /*head_dim*/) { return 64; }

// Forward, warps per CTA. Up to 128, 4 warps of 32 rows each: every K/V
// fragment read from shared memory feeds two m16 row blocks, halving the
// shared-memory traffic per mma; 2 CTAs fit on an SM (about 100 KB of shared
// memory each). From 160 on, a warp's 32 x D float accumulator no longer fits
// in registers, so 8 warps take 16 rows each.
constexpr int fwd_num_warps(int head_dim) { return head_dim <= 128 ? 4 : 8; }

// CTAs meant to share an SM; sets the register cap (__launch_bounds__).
// Up to head dim 128 two CTAs of 4 warps fit (255 registers each thread,
// about 100 KB of shared memory each); above, one CTA of 8 warps.
constexpr int fwd_min_ctas_per_sm(int head_dim) {
  return head_dim <= 128 ? 2 : 1;
}

// Shared-memory rows are padded by 8 elements (16 bytes): the row pitch is
// then an odd number of 16-byte units for every supported head dim (D / 8 is
// even), so the 8 row addresses of an ldmatrix hit 8 different bank groups.
constexpr int smem_row_pitch(int head_dim) { return head_dim + 8; }

}  // namespace jax_flash
