// Tile sizes of the sm90 (wgmma/TMA) forward kernel, as constexpr functions
// of the head dim, with the reason for each.
#pragma once

namespace jax_flash {
namespace sm90 {

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

// Warpgroups: one producer (one thread issues every TMA) and two consumers
// of 64 query rows each (wgmma's M is 64 per warpgroup), so that every K/V
// tile in shared memory serves 128 rows.
constexpr int kFwdConsumerWarpgroups = 2;
constexpr int fwd_threads(int consumer_warpgroups) {
  return (consumer_warpgroups + 1) * 128;
}

// Consumer warpgroups of the plain variant (no score modifier, no segment
// ids): three at D = 64, a 192-row tile. A D = 64 step's two GEMMs are half
// as long as at D = 128 while its softmax is as long (64 x 128 exponentials
// a warpgroup), so with two warpgroups taking turns the tensor cores wait
// for a softmax every step; with three in round robin two softmaxes run
// under the third's GEMMs, and each K/V tile serves 1.5x the rows.
// FlashAttention-3 makes the same choice. Measured on an H200 (bf16, 16k
// tokens; TFLOP/s against two warpgroups with 176-key tiles): without a
// mask +7% / +12% / +12% at 1k / 4k / 16k, causal -11% / +4% / +7% with
// the last query tile padded; with the first one padded instead
// (FwdKernelTraits::kPadFirstTile) causal 4k gained 2-3% more and causal 1k
// was still 3-4% slower than two warpgroups (a larger masked share per
// diagonal tile, a third fewer tiles to balance). So under a bound right
// of the diagonal (causal) they are used only from kFwdTallTileMinKeys keys
// on. The other variants keep two: at 160 registers a thread their masks
// spill 680-1,424 bytes, most of it in the main loop. Two at the other head
// dims: at D = 96 three spill 440 bytes (about 130 spill loads and stores
// in the main loop), from D = 128 on the accumulators alone would fill the
// 160 registers, and D = 32 was not measured.
constexpr int fwd_plain_consumer_warpgroups(int head_dim) {
  return head_dim == 64 ? 3 : 2;
}
constexpr int kFwdTallTileMinKeys = 4096;

// Registers per thread after `setmaxnreg`: the producer gives most of its
// share to the consumers (24 + 2 x 240 = 504 and 32 + 3 x 160 = 512, within
// the 512 a lane has of the SM's 64K registers).
constexpr int fwd_producer_registers(int consumer_warpgroups) {
  return consumer_warpgroups == 3 ? 32 : 24;
}
constexpr int fwd_consumer_registers(int consumer_warpgroups) {
  return consumer_warpgroups == 3 ? 160 : 240;
}

}  // namespace sm90
}  // namespace jax_flash
