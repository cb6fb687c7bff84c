// Tile sizes and the split-KV plan of the decoding kernels, as constexpr
// host/device functions so that the launcher, the FFI handler and the
// workspace query (`jax_flash_decode_workspace_bytes`) agree.
#pragma once

#include "common/utils.h"

namespace jax_flash {

// Warps per decoding CTA. Four warps, each with its own m16 block of query
// rows or its own share of every key tile, keep two CTAs per SM with enough
// loads in flight to saturate HBM (see decode_kernel.h).
constexpr int kDecodeWarps = 4;

// Keys per pipeline stage: 64 rows of K and of V (16 KB each at D = 128).
constexpr int kDecodeBlockN = 64;

// K/V stages in flight: three up to D = 128 (about 105 KB of shared memory,
// two CTAs per SM), two at D = 256 (about 135 KB, one CTA).
constexpr int decode_stages(int head_dim) { return head_dim <= 128 ? 3 : 2; }

// Query rows per CTA for `rows` = (H / Hkv) * Sq packed rows of one K/V head:
// 16 (the four warps split each key tile four ways), 32 (two ways) or 64
// (the warps split the rows). Every row of a CTA shares its K/V reads.
constexpr int decode_rows_per_cta(int rows) {
  return rows <= 16 ? 16 : rows <= 32 ? 32 : 64;
}

// Fewest keys a split is given at full capacity: shorter splits spend more
// on the pipeline's fill and on the combine than they save.
constexpr int kDecodeMinKeysPerSplit = 256;

// Most splits of one row; bounds the float32 partials of the workspace.
constexpr int kDecodeMaxSplits = 64;

// Multiprocessor count the workspace is sized for: plans for devices with
// more SMs are computed as if they had this many.
constexpr int kDecodeMaxSms = 256;

// Split-KV plan: how many key ranges each (row tile, batch row, K/V head)
// is cut into. As many as fill the resident CTA slots (two per SM) in one
// wave without a second, mostly empty wave; none beyond what leaves every
// split kDecodeMinKeysPerSplit keys of the capacity.
constexpr int decode_num_splits(int batch, int kv_heads, int rows,
                                int capacity, int num_sms) {
  const int sms = num_sms < kDecodeMaxSms ? num_sms : kDecodeMaxSms;
  const int ctas = batch * kv_heads * ceil_div(rows, decode_rows_per_cta(rows));
  const int slots = 2 * (sms > 0 ? sms : 1);
  int splits = ctas > 0 ? slots / ctas : 1;
  const int most = capacity / kDecodeMinKeysPerSplit;
  splits = splits < most ? splits : most;
  splits = splits < kDecodeMaxSplits ? splits : kDecodeMaxSplits;
  return splits > 1 ? splits : 1;
}

}  // namespace jax_flash
