// Tile sizes of the sm90 (wgmma/TMA) forward kernel, as constexpr functions
// of the head dim, with the reason for each.
#pragma once

namespace jax_flash {
namespace sm90 {

// Query rows per CTA: two consumer warpgroups of 64 rows each (wgmma's M is
// 64 per warpgroup); every K/V tile in shared memory serves 128 rows.
constexpr int fwd_block_m(int /*head_dim*/) { return 128; }

// Keys per mainloop step. The score tile is 64 x kBlockN floats per
// warpgroup (kBlockN / 2 registers a thread) beside the 64 x D output
// (D / 2 registers): 128 keys up to D = 128, 96 at D = 192 and 80 at D =
// 256 keep both under the 240 registers a consumer thread gets (at D = 256
// the main loop holds no spills; the epilogue reloads a few addresses), and
// keep Q + two K and V stages within 227 KB of shared memory (224 KB at D =
// 256). 80 keys rather than 64 at D = 256 spread a step's fixed costs over
// 25% more keys (FlashAttention-3's choice): +2% to +12% in the six D = 256
// forward cells of the benchmark grid on an H200.
constexpr int fwd_block_n(int head_dim) {
  return head_dim <= 128 ? 128 : head_dim <= 192 ? 96 : 80;
}

// Longer K/V tiles for the plain variant (no score modifier, no segment
// ids) at D = 64: 176 keys; 0 (none) at every other head dim, D = 32 too
// (not measured there). A D = 64 step's two GEMMs are short, so its fixed
// costs (the row max and sum across a quad, the pipelines' and the
// tensor-core turns' barriers) weigh more; 176 keys spread them over 37%
// more keys. Shared memory then holds two Q buffers and three K/V stages
// in 165 KB. Measured on an H200 (bf16, 16k tokens; TFLOP/s, 128 -> 176
// keys): without a mask +0% / +4% / +6% at 1k / 4k / 16k, causal -9% / +2%
// / +6%, so causal calls take them only from kFwdLongTileMinKeys keys on.
// The score-modifier and segment variants keep 128 keys: at 176 they spill
// 288-344 bytes.
constexpr int fwd_long_block_n(int head_dim) {
  return head_dim == 64 ? 176 : 0;
}
constexpr int kFwdLongTileMinKeys = 4096;

// K and V buffers each: two, so that the TMA of tile n+1 runs under the
// GEMMs of tile n; three at D = 64, whose shorter GEMMs hide less of a
// load: +2 to +5% on five of the six D = 64 forward cells of the benchmark
// grid, -0.7% at causal 1k (H200; 112 KB of shared memory).
constexpr int fwd_stages(int head_dim) { return head_dim <= 64 ? 3 : 2; }

// Ping-pong of the two consumer warpgroups (one's softmax under the
// other's GEMMs): worth it where the softmax is a large share of a step,
// i.e. up to D = 128; at D = 256 the GEMMs dominate and turn-taking would
// only idle the tensor cores (FlashAttention-3 makes the same choice).
constexpr bool fwd_ping_pong(int head_dim) { return head_dim <= 128; }

// Persistent grid (one CTA per SM claiming tiles) up to D = 128. Above, the
// 64 x D output and the 64 x kBlockN scores leave no registers for the
// state a tile loop carries: at D = 256 the persistent loop spilled 368
// bytes against 80 and ran the causal 16k forward 18% slower (583 vs 711
// TFLOP/s), so those head dims launch one CTA per tile.
constexpr bool fwd_persistent(int head_dim) { return head_dim <= 128; }

// Q buffers: two for the persistent grid, so that the producer loads the
// next tile's Q (and, as K/V stages free up, its first K/V tiles) while the
// consumers still compute the current tile, instead of after their last
// GEMM of it; the consumers then find the next tile in shared memory when
// their epilogue ends. 192 KB of shared memory at D = 128. One CTA per tile
// (D > 128) has no next tile to load, and no shared memory to spare.
constexpr int fwd_q_stages(int head_dim) {
  return fwd_persistent(head_dim) ? 2 : 1;
}

// Warpgroups: one producer (one thread issues every TMA) and two consumers.
constexpr int kFwdConsumerWarpgroups = 2;
constexpr int kFwdThreads = (kFwdConsumerWarpgroups + 1) * 128;

// Registers per thread after `setmaxnreg`: the producer gives most of its
// share to the consumers (24 + 2 x 240 = 504 <= 512 per lane of the SM's
// 64K registers for 384 threads).
constexpr int kFwdProducerRegisters = 24;
constexpr int kFwdConsumerRegisters = 240;

}  // namespace sm90
}  // namespace jax_flash
