// The wgmma accumulator seen as rows and columns, and the online softmax over
// it. A warpgroup's m64nN accumulator gives each thread two rows (lane / 4
// and lane / 4 + 8 of its warp's 16) and, per 8-column group, two adjacent
// columns: per thread ((2 columns, 2 rows, N / 8 groups), MMA_M, MMA_N). A
// row is spread over the 4 lanes of a quad, as in the sm80 kernels.
#pragma once

#include <cmath>

#include <cute/tensor.hpp>

#include "common/utils.h"

namespace jax_flash {
namespace sm90 {

// ((2, 2, G), M, N) -> ((2 rows, M), (2 columns, G, N)).
template <class Layout>
__host__ __device__ constexpr auto accumulator_rows_cols(Layout layout) {
  using cute::get;
  return cute::make_layout(
      cute::make_layout(get<0, 1>(layout), get<1>(layout)),
      cute::make_layout(get<0, 0>(layout), get<0, 2>(layout),
                        get<2>(layout)));
}

// The accumulator of S (m64 x kBlockN) as the register A operand of O += P V
// (m64 x k16 steps): column groups 2k and 2k + 1 of S are the two k-halves
// of step k. ((2, 2, G), M, N) -> ((2, 2, 2), M, (G / 2, N)).
template <class Layout>
__host__ __device__ constexpr auto accumulator_as_operand_a(Layout layout) {
  using cute::get;
  auto groups = cute::logical_divide(get<0, 2>(layout),
                                     cute::make_layout(cute::_2{}));
  return cute::make_layout(
      cute::make_layout(get<0, 0>(layout), get<0, 1>(layout),
                        get<0>(groups)),
      get<1>(layout), cute::make_layout(get<1>(groups), get<2>(layout)));
}

// Running max and sum of a thread's kRows rows (kRows = 2 * MMA_M).
template <int kRows>
struct RowSoftmax {
  float row_max[kRows];  // of the logits seen so far (raw units)
  float row_sum[kRows];  // this lane's share of sum(exp2(...))

  __device__ __forceinline__ void init() {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      row_max[r] = -INFINITY;
      row_sum[r] = 0.f;
    }
  }

  // Folds the score tile `s` (rows x cols view) in: s becomes the
  // unnormalized probabilities exp2(s * scale_log2 - max * scale_log2), and
  // `rescale` gets the factor by which each row of the output accumulated so
  // far must be multiplied (1 where the max did not grow). The output itself
  // is left alone: its next P V product may still be in flight.
  template <class TensorS>
  __device__ __forceinline__ void update(TensorS& s, float scale_log2,
                                         float (&rescale)[kRows]) {
    static_assert(decltype(cute::size<0>(s))::value == kRows, "row count");
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      float m = -INFINITY;
#pragma unroll
      for (int c = 0; c < cute::size<1>(s); ++c) m = fmaxf(m, s(r, c));
      m = quad_max(m);
      rescale[r] = 1.f;
      if (m > row_max[r]) {
        rescale[r] = exp2_approx((row_max[r] - m) * scale_log2);
        row_max[r] = m;
      }
      // Nothing visible yet: max -inf; subtract 0 so exp2 gives 0, not NaN.
      const float m_scaled =
          row_max[r] == -INFINITY ? 0.f : row_max[r] * scale_log2;
      float sum = 0.f;
#pragma unroll
      for (int c = 0; c < cute::size<1>(s); ++c) {
        const float p = exp2_approx(fmaf(s(r, c), scale_log2, -m_scaled));
        s(r, c) = p;
        sum += p;
      }
      row_sum[r] = fmaf(row_sum[r], rescale[r], sum);
    }
  }

  // Multiplies each row of the output accumulator `o` (rows x cols view) by
  // its factor from update().
  template <class TensorO>
  __device__ __forceinline__ static void rescale_rows(
      TensorO& o, const float (&rescale)[kRows]) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
#pragma unroll
      for (int c = 0; c < cute::size<1>(o); ++c) o(r, c) *= rescale[r];
    }
  }

  // 1 / sum for each row (0 for a row that saw nothing) and its natural-log
  // lse (-inf for such a row).
  __device__ __forceinline__ void finalize(float (&inv_sum)[kRows],
                                           float (&lse)[kRows],
                                           float scale_log2) {
    constexpr float kLn2 = 0.6931471805599453f;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const float sum = quad_sum(row_sum[r]);
      const bool empty = !(sum > 0.f);
      inv_sum[r] = empty ? 0.f : 1.f / sum;
      lse[r] = empty ? -INFINITY : row_max[r] * scale_log2 * kLn2 + logf(sum);
    }
  }
};

}  // namespace sm90
}  // namespace jax_flash
