// Tile sizes of the sm90 (wgmma/TMA) backward kernel, with the reason for
// each.
#pragma once

namespace jax_flash {
namespace sm90 {

// Above D = 128 the kernel runs split-D (FlashAttention-3's D = 256 plan):
// dK and dV of 128 keys x D would take 2 * 64 * D / 128 = 256 registers a
// consumer thread at D = 256, so a CTA takes 64 keys and the two consumer
// warpgroups split every product differently:
//   S^T, dP^T       64 keys x 32 queries each (the two query halves);
//   dV, dK, dQ      D / 2 columns each (dK + dV: 128 registers at D = 256).
// P^T and dS^T go through shared memory (each warpgroup's dV and dK need
// the other's queries), and the three key-side products read both from
// there.
constexpr bool bwd_split_head_dim(int head_dim) { return head_dim > 128; }

// Keys per CTA: two consumer warpgroups of 64 keys each (wgmma's M is 64 per
// warpgroup, and the keys are the M of S^T, dP^T, dV and dK). Each consumer
// thread keeps dK and dV of its 64 keys in registers: 2 * 64 * D / 128
// floats, 128 registers at D = 128. Split-D: 64 keys shared by both.
constexpr int bwd_block_n(int head_dim) {
  return bwd_split_head_dim(head_dim) ? 64 : 128;
}

// Query rows per step: 64, so that S^T and dP^T (64 keys x 64 queries per
// warpgroup) take 32 registers each beside dK and dV.
constexpr int kBwdBlockM = 64;

// Q/dO buffers: two, so that the TMA loads of step t + 1 run under the
// GEMMs of step t. Split-D at D = 256 has room for one: K, V, Q, dO (32 KB
// each), P^T and dS^T (8 KB each) and the float32 dQ tile (64 KB) leave
// less than the 64 KB a second Q/dO stage needs within 227 KB. At D = 192
// (24 KB tiles, a 48 KB dQ tile) the second stage fits: +9-14% over one in
// the four D = 192 backward cells on an H200 (docs/performance.md).
constexpr int bwd_stages(int head_dim) { return head_dim > 192 ? 1 : 2; }

// Head dims the kernel is written for; the others keep the sm80 backward.
// D = 96 runs the D = 128 plan (dK + dV: 96 registers a consumer thread;
// K and V in 32-byte swizzle atoms), D = 160, 192 and 224 the split-D one
// (80, 96 and 112 columns per warpgroup; 32-byte atoms at 160 and 224,
// 64-byte ones at 192; one Q/dO stage at 224); flash_bwd_kernel_traits.h
// says why. All compile without spills but D = 224 (57 local loads and
// stores in its SASS), which still runs 1.6-1.8x the sm80 backward on an
// H200, at 0.73-0.87x of cuDNN's; D = 160 runs 1.9-2.2x the sm80 one and
// 1.4-1.6x cuDNN's (docs/performance.md).
constexpr bool bwd_supports_head_dim(int head_dim) {
  return head_dim == 64 || head_dim == 96 || head_dim == 128 ||
         head_dim == 160 || head_dim == 192 || head_dim == 224 ||
         head_dim == 256;
}

// One producer warpgroup (one thread issues every TMA) and two consumers.
constexpr int kBwdConsumerWarpgroups = 2;
constexpr int kBwdThreads = (kBwdConsumerWarpgroups + 1) * 128;
constexpr int kBwdProducerRegisters = 24;
constexpr int kBwdConsumerRegisters = 240;

}  // namespace sm90
}  // namespace jax_flash
