// Masks and score modifiers, as small functors the mainloops call.
//
// Semantics (docs/ffi_contract.md): for batch row b, offset = kv_len - q_len
// and d = i + offset - j for query i, key j.
//   logit = q.k * softmax_scale; softcap > 0: softcap * tanh(logit / softcap);
//   alibi: logit -= slope[b, h] * |d|.
//   key j visible iff j < kv_len, i < q_len, (window_left < 0 or d <=
//   window_left), (window_right < 0 or -d <= window_right), and equal segment
//   ids when given.
//
// `AttentionMask` answers per element (`visible`) and per tile: the range of
// keys a block of queries can see (forward loop bounds), the range of queries
// a block of keys is seen by (backward loop bounds), and whether a tile needs
// per-element masking at all.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/flash.h"

namespace jax_flash {

struct AttentionMask {
  int q_len;   // queries at or past it see nothing
  int kv_len;  // keys at or past it are invisible
  int offset;  // kv_len - q_len: aligns the diagonal bottom-right
  int window_left;   // -1 = unbounded
  int window_right;  // -1 = unbounded
  const int32_t* q_segment_ids;   // row b of (B, Sq), or nullptr
  const int32_t* kv_segment_ids;  // row b of (B, Sk), or nullptr

  // The mask of batch row `b`.
  __device__ __forceinline__ static AttentionMask make(const FwdParams& p,
                                                       int b) {
    AttentionMask m;
    m.q_len = p.q_lengths ? min(p.q_lengths[b], p.seqlen_q) : p.seqlen_q;
    m.kv_len = p.kv_lengths ? min(p.kv_lengths[b], p.seqlen_k) : p.seqlen_k;
    m.q_len = max(m.q_len, 0);
    m.kv_len = max(m.kv_len, 0);
    m.offset = m.kv_len - m.q_len;
    m.window_left = p.window_left;
    m.window_right = p.window_right;
    m.q_segment_ids = p.q_segment_ids
        ? p.q_segment_ids + static_cast<int64_t>(b) * p.seqlen_q : nullptr;
    m.kv_segment_ids = p.kv_segment_ids
        ? p.kv_segment_ids + static_cast<int64_t>(b) * p.seqlen_k : nullptr;
    return m;
  }

  // Whether query i sees key j, by position only (no segment ids).
  __device__ __forceinline__ bool visible_by_position(int i, int j) const {
    const int d = i + offset - j;
    return j < kv_len && i < q_len &&
           (window_left < 0 || d <= window_left) &&
           (window_right < 0 || -d <= window_right);
  }

  // Whether query i sees key j. Segment ids are read from global memory: a
  // mainloop that tests many elements should cache them (see `has_segments`).
  __device__ __forceinline__ bool visible(int i, int j) const {
    return visible_by_position(i, j) &&
           (q_segment_ids == nullptr ||
            q_segment_ids[i] == kv_segment_ids[j]);
  }

  __device__ __forceinline__ bool has_segments() const {
    return q_segment_ids != nullptr;
  }

  // Keys [key_begin, key_end) hold every key that some query in [m0, m1)
  // sees; may be empty (key_begin >= key_end).
  __device__ __forceinline__ int key_begin(int m0) const {
    return window_left < 0 ? 0 : max(0, m0 + offset - window_left);
  }
  __device__ __forceinline__ int key_end(int m1) const {
    if (min(m1, q_len) <= 0) return 0;
    const int last_q = min(m1, q_len) - 1;
    return window_right < 0 ? kv_len
                            : min(kv_len, last_q + offset + window_right + 1);
  }

  // Queries [query_begin, query_end) hold every query that sees some key in
  // [n0, n1); may be empty.
  __device__ __forceinline__ int query_begin(int n0) const {
    return window_right < 0 ? 0 : max(0, n0 - offset - window_right);
  }
  __device__ __forceinline__ int query_end(int n1) const {
    if (min(n1, kv_len) <= 0) return 0;
    const int last_k = min(n1, kv_len) - 1;
    return window_left < 0 ? q_len
                           : min(q_len, last_k - offset + window_left + 1);
  }

  // Keys query i sees by position: [row_key_begin(i), row_key_end(i)),
  // empty for a query past q_len. Mainloops test two integers per element.
  __device__ __forceinline__ int row_key_begin(int i) const {
    return key_begin(i);
  }
  __device__ __forceinline__ int row_key_end(int i) const {
    if (i >= q_len) return 0;
    return window_right < 0 ? kv_len
                            : min(kv_len, i + offset + window_right + 1);
  }

  // Keys [*lo, *hi) are visible to every query in [m0, m1) (queries past
  // q_len aside, as in tile_needs_mask); empty with segment ids. Key tiles
  // inside this range run without per-element masking.
  __device__ __forceinline__ void unmasked_keys(int m0, int m1, int* lo,
                                                int* hi) const {
    if (q_segment_ids != nullptr) {
      *lo = *hi = 0;
      return;
    }
    *hi = window_right < 0 ? kv_len
                           : min(kv_len, m0 + offset + window_right + 1);
    *lo = window_left < 0 ? 0 : max(0, (m1 - 1) + offset - window_left);
  }

  // False when every (i, j) in [m0, m1) x [n0, n1) is visible, so the tile
  // can skip per-element masking. Query rows past q_len count as visible
  // here: the forward zeroes them in its epilogue and the backward never
  // lets them contribute (their lse is -inf), so they need no mask.
  __device__ __forceinline__ bool tile_needs_mask(int m0, int m1, int n0,
                                                  int n1) const {
    if (q_segment_ids != nullptr || n1 > kv_len) return true;
    // d ranges over [m0 + offset - (n1 - 1), (m1 - 1) + offset - n0].
    if (window_left >= 0 && (m1 - 1) + offset - n0 > window_left) return true;
    if (window_right >= 0 && (n1 - 1) - m0 - offset > window_right) {
      return true;
    }
    return false;
  }
};

// softcap * tanh(x / softcap), and its derivative for the backward.
struct Softcap {
  float cap;
  float inv_cap;

  __device__ __forceinline__ static Softcap make(const FwdParams& p) {
    return {p.softcap, p.softcap > 0.f ? 1.f / p.softcap : 0.f};
  }
  __device__ __forceinline__ bool enabled() const { return cap > 0.f; }
  // x: the scaled logit q.k * softmax_scale.
  __device__ __forceinline__ float operator()(float x) const {
    return cap * tanhf(x * inv_cap);
  }
  // d(capped)/dx, from the capped value y = softcap(x).
  __device__ __forceinline__ float grad_from_output(float y) const {
    const float t = y * inv_cap;
    return 1.f - t * t;
  }
};

// ALiBi: bias = -slope * |i + offset - j| added to the logit.
struct Alibi {
  float slope;  // 0 when no slopes were given
  int offset;

  __device__ __forceinline__ static Alibi make(const FwdParams& p, int b,
                                               int h,
                                               const AttentionMask& mask) {
    const float s = p.alibi_slopes
        ? p.alibi_slopes[static_cast<int64_t>(b) * p.num_heads + h] : 0.f;
    return {s, mask.offset};
  }
  __device__ __forceinline__ bool enabled() const { return slope != 0.f; }
  __device__ __forceinline__ float operator()(int i, int j) const {
    return -slope * fabsf(static_cast<float>(i + offset - j));
  }
  // d(bias)/d(slope), for dalibi.
  __device__ __forceinline__ float grad_slope(int i, int j) const {
    return -fabsf(static_cast<float>(i + offset - j));
  }
};

// The score modifiers in the order the contract applies them: the natural
// log-domain logit of raw dot product `dot` at (i, j).
struct ScoreMod {
  float scale;
  Softcap softcap;
  Alibi alibi;

  __device__ __forceinline__ static ScoreMod make(const FwdParams& p, int b,
                                                  int h,
                                                  const AttentionMask& mask) {
    return {p.softmax_scale, Softcap::make(p), Alibi::make(p, b, h, mask)};
  }
  // True when logits are more than q.k * scale.
  __device__ __forceinline__ bool enabled() const {
    return softcap.enabled() || alibi.enabled();
  }
  __device__ __forceinline__ float operator()(float dot, int i, int j) const {
    float x = dot * scale;
    if (softcap.enabled()) x = softcap(x);
    if (alibi.enabled()) x += alibi(i, j);
    return x;
  }
};

}  // namespace jax_flash
