// Online softmax over the score fragments of one warp (mma.sync C layout:
// lane 4g+t holds rows g and g+8 of each 16-row block, columns 2t and 2t+1 of
// each 8-column tile; a row is spread over the 4 lanes of a quad).
#pragma once

#include <cmath>

#include "common/utils.h"

namespace jax_flash {

// Running max and sum of kRowBlocks 16-row blocks, two rows per block a lane.
template <int kRowBlocks>
struct OnlineSoftmax {
  // Max of the raw scores seen so far (scaled by scale_log2 when used).
  float row_max[kRowBlocks][2];
  // This lane's share of sum(exp2(score * scale_log2 - max * scale_log2)).
  float row_sum[kRowBlocks][2];

  __device__ __forceinline__ void init() {
#pragma unroll
    for (int mb = 0; mb < kRowBlocks; ++mb) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        row_max[mb][r] = -INFINITY;
        row_sum[mb][r] = 0.f;
      }
    }
  }

  // Folds score tile s in: s becomes the unnormalized probabilities
  // p = exp2(s * scale_log2 - max * scale_log2) <= 1, and acc (the output
  // rows) and the sums are rescaled where a row's max grew. A warp whose
  // rows all kept their max (most tiles of a long row) skips the pass over
  // its accumulator. (Letting the max trail the true one by a few powers of
  // two would skip more passes, but it measurably raised the error of the
  // 16-bit P: the largest p are then rounded instead of being exactly 1.)
  template <int kNTiles, int kDTiles>
  __device__ __forceinline__ void update(float (&s)[kRowBlocks][kNTiles][4],
                                         float (&acc)[kRowBlocks][kDTiles][4],
                                         float scale_log2) {
    float rescale[kRowBlocks][2];
    bool any_moved = false;
#pragma unroll
    for (int mb = 0; mb < kRowBlocks; ++mb) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float m = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt) {
          m = fmaxf(m, fmaxf(s[mb][nt][2 * r], s[mb][nt][2 * r + 1]));
        }
        m = quad_max(m);
        const float old = row_max[mb][r];
        rescale[mb][r] = 1.f;
        if (m > old) {
          rescale[mb][r] = exp2_approx((old - m) * scale_log2);
          row_max[mb][r] = m;
          any_moved = true;
        }
        // A row with nothing visible yet keeps max -inf; subtract 0 so its
        // exp2 gives 0 rather than NaN.
        const float m_scaled =
            row_max[mb][r] == -INFINITY ? 0.f : row_max[mb][r] * scale_log2;
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float p =
                exp2_approx(fmaf(s[mb][nt][2 * r + e], scale_log2, -m_scaled));
            s[mb][nt][2 * r + e] = p;
            sum += p;
          }
        }
        row_sum[mb][r] = fmaf(row_sum[mb][r], rescale[mb][r], sum);
      }
    }
    // Warp-uniform: skip the accumulator pass when no row moved.
    if (__any_sync(0xffffffffu, any_moved)) {
#pragma unroll
      for (int mb = 0; mb < kRowBlocks; ++mb) {
#pragma unroll
        for (int dt = 0; dt < kDTiles; ++dt) {
          acc[mb][dt][0] *= rescale[mb][0];
          acc[mb][dt][1] *= rescale[mb][0];
          acc[mb][dt][2] *= rescale[mb][1];
          acc[mb][dt][3] *= rescale[mb][1];
        }
      }
    }
  }

  // Completes the sums over the quad; returns 1 / sum for each row (0 for a
  // row that saw nothing) and writes its natural-log lse (-inf for such a
  // row) to lse.
  __device__ __forceinline__ void finalize(float (&inv_sum)[kRowBlocks][2],
                                           float (&lse)[kRowBlocks][2],
                                           float scale_log2) {
    constexpr float kLn2 = 0.6931471805599453f;
#pragma unroll
    for (int mb = 0; mb < kRowBlocks; ++mb) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float sum = quad_sum(row_sum[mb][r]);
        const bool empty = !(sum > 0.f);
        inv_sum[mb][r] = empty ? 0.f : 1.f / sum;
        lse[mb][r] = empty ? -INFINITY
                           : row_max[mb][r] * scale_log2 * kLn2 + logf(sum);
      }
    }
  }
};

}  // namespace jax_flash
