// Tile sizes of the sm90 (wgmma/TMA) backward kernel, with the reason for
// each.
#pragma once

namespace jax_flash {
namespace sm90 {

// Keys per CTA: two consumer warpgroups of 64 keys each (wgmma's M is 64 per
// warpgroup, and the keys are the M of S^T, dP^T, dV and dK). Each consumer
// thread keeps dK and dV of its 64 keys in registers: 2 * 64 * D / 128
// floats, 128 registers at D = 128.
constexpr int kBwdBlockN = 128;

// Query rows per step: 64, so that S^T and dP^T (64 keys x 64 queries per
// warpgroup) take 32 registers each beside dK and dV.
constexpr int kBwdBlockM = 64;

// Q/dO buffers: two, so that the TMA loads of step t + 1 run under the
// GEMMs of step t.
constexpr int kBwdStages = 2;

// Head dims the kernel is written for; the others keep the sm80 backward
// (at D = 256, dK and dV alone would take 256 registers a thread).
constexpr bool bwd_supports_head_dim(int head_dim) {
  return head_dim == 64 || head_dim == 128;
}

// One producer warpgroup (one thread issues every TMA) and two consumers.
constexpr int kBwdConsumerWarpgroups = 2;
constexpr int kBwdThreads = (kBwdConsumerWarpgroups + 1) * 128;
constexpr int kBwdProducerRegisters = 24;
constexpr int kBwdConsumerRegisters = 240;

}  // namespace sm90
}  // namespace jax_flash
