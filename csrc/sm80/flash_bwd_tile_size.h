// Tile shapes and workspace layout of the backward pass, shared by the
// kernels and by `jax_flash_bwd_workspace_bytes` (which must agree on them).
#pragma once

#include <cstdint>

#include "common/utils.h"

namespace jax_flash {

// Query rows per inner-loop step. 64 keeps the recomputed S and dP (two
// 64 x kBlockN float tiles) at 32 registers each per thread. At D = 64 the
// dK/dV accumulators leave room for 128 rows (64 registers each, no spills),
// which halves the steps and their barriers per key tile: the backward went
// from 0.73-0.81x to 0.90-0.95x of FlashAttention-2 on an H100
// (docs/performance.md). Its two Q/dO stages then need 187 KB of shared
// memory, so an A100 runs the one-stage variant there.
constexpr int bwd_block_m(int head_dim) { return head_dim == 64 ? 128 : 64; }

// Keys per CTA. A CTA keeps dK and dV for its keys in registers: 2 * kBlockN
// * D / 256 floats per thread. 128 keys up to D = 128 (128 registers), 64 keys
// beyond (at most 128 registers again at D = 256), so that one CTA of 8 warps
// stays under the 255-register limit without spilling.
constexpr int bwd_block_n(int head_dim) { return head_dim <= 128 ? 128 : 64; }

// Threads per CTA of the main backward kernel: 8 warps.
constexpr int kBwdThreads = 256;

// Byte offsets of the scratch regions inside the u8 workspace operand. Every
// region starts on a 256-byte boundary.
// Rows per head of the row_stats region: Sq rounded up to 128.
constexpr int64_t row_stats_pitch(int64_t seqlen_q) {
  return (seqlen_q + 127) / 128 * 128;
}

struct BwdWorkspaceLayout {
  // f32: dQ summed over key tiles, (B, H, round_up(Sq, 128), D); the sm80
  // kernel keeps rows (B, H, Sq, D) in it, the sm90 kernel 64-row tiles at
  // the padded pitch in its own order (sm90/bwd_dq_tile.h).
  int64_t dq_accum = 0;
  int64_t delta = 0;      // f32 (B, H, Sq): rowsum(dO * O)
  int64_t dq_semaphore = 0;  // s32 (B, H, Sq / kBlockM): deterministic order
  // f32x4 (B, H, Sq): per query row, (sum P dP |d|, sum P |d|, sum P dP, -)
  // over the keys, from which dalibi = sum over rows of the third times the
  // second minus the first (docs in flash_bwd_convert.h).
  int64_t dalibi_rows = 0;
  // f32x2 (B, H, round_up(Sq, 128)): per query row (lse * log2 e, delta),
  // +inf and 0 for rows that see no key or lie past Sq; the sm90 kernel
  // loads a step's rows with one bulk copy, so each head's rows are padded.
  int64_t row_stats = 0;
  int64_t total = 0;

  static BwdWorkspaceLayout make(int64_t batch, int64_t seqlen_q,
                                 int64_t num_heads, int64_t head_dim,
                                 bool deterministic) {
    auto align = [](int64_t bytes) { return (bytes + 255) / 256 * 256; };
    const int64_t rows = batch * num_heads * seqlen_q;
    BwdWorkspaceLayout w;
    int64_t at = 0;
    w.dq_accum = at;
    at += align(batch * num_heads * row_stats_pitch(seqlen_q) * head_dim * 4);
    w.delta = at;
    at += align(rows * 4);
    w.dq_semaphore = at;
    if (deterministic) {
      // Enough for the smallest query tile of any arch's kernel (64 rows).
      const int m_blocks = ceil_div(static_cast<int>(seqlen_q), 64);
      at += align(batch * num_heads * m_blocks * 4);
    }
    w.dalibi_rows = at;
    at += align(rows * 16);
    w.row_stats = at;
    at += align(batch * num_heads * row_stats_pitch(seqlen_q) * 8);
    w.total = at;
    return w;
  }
};

}  // namespace jax_flash
