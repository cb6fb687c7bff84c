// Masks and score modifiers: the functors every mainloop calls, in both
// directions and on every architecture. They take (query row, key column)
// coordinates and score values, never a fragment layout, so a mainloop of any
// MMA shape applies them to the elements it holds; a new mask or score
// variant changes this file alone.
//
// Semantics (docs/ffi_contract.md): for batch row b, offset = kv_len - q_len
// (+ q_offset - kv_offset, the row's position offset, when given) and
// d = i + offset - j for query i, key j.
//   logit = q.k * softmax_scale; softcap > 0: softcap * tanh(logit / softcap);
//   alibi: logit -= slope[b, h] * |d|.
//   key j visible iff j < kv_len, i < q_len, (window_left < 0 or d <=
//   window_left), (window_right < 0 or -d <= window_right), and equal segment
//   ids when given.
//
// `AttentionMask` answers per tile: the range of keys a block of queries can
// see (forward loop bounds), the range of queries a block of keys is seen by
// (backward loop bounds), and whether a tile needs per-element masking at
// all; per query row it gives a `MaskRow`, which tests keys one by one.
// `ScoreMod` turns a raw q.k into the logit.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/flash.h"
#include "common/utils.h"

namespace jax_flash {

// What one query row sees: keys [key_begin, key_end) by position (lengths,
// causal, window) and, with segment ids, only keys of its segment. A
// mainloop makes one per row, so that the per-row work happens once, and
// tests each key it holds.
struct MaskRow {
  int key_begin;
  int key_end;
  int segment;  // its segment id (0 without segment ids or past q_len)

  // Whether segment ids q and kv let a query see a key.
  __device__ __forceinline__ static bool same_segment(int q, int kv) {
    return q == kv;
  }
  // Whether the row sees key j by position.
  __device__ __forceinline__ bool sees(int j) const {
    return j >= key_begin && j < key_end;
  }
  // Whether the row sees key j, whose segment id is kv_segment.
  __device__ __forceinline__ bool sees(int j, int kv_segment) const {
    return sees(j) && same_segment(segment, kv_segment);
  }
  // The same row with keys counted from `origin` (a tile's first key, say),
  // so that a mainloop can test offsets known at compile time.
  __device__ __forceinline__ MaskRow from(int origin) const {
    return {key_begin - origin, key_end - origin, segment};
  }
};

struct AttentionMask {
  int q_len;   // queries at or past it see nothing
  int kv_len;  // keys at or past it are invisible
  int offset;  // kv_len - q_len (+ position offset): the aligned diagonal
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
    m.offset = m.kv_len - m.q_len +
               (p.position_offsets ? p.position_offsets[b] : 0);
    m.window_left = p.window_left;
    m.window_right = p.window_right;
    m.q_segment_ids = p.q_segment_ids
        ? p.q_segment_ids + static_cast<int64_t>(b) * p.seqlen_q : nullptr;
    m.kv_segment_ids = p.kv_segment_ids
        ? p.kv_segment_ids + static_cast<int64_t>(b) * p.seqlen_k : nullptr;
    return m;
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
  __host__ __device__ __forceinline__ int query_begin(int n0) const {
    return window_right < 0 ? 0 : max(0, n0 - offset - window_right);
  }
  __host__ __device__ __forceinline__ int query_end(int n1) const {
    if (min(n1, kv_len) <= 0) return 0;
    const int last_k = min(n1, kv_len) - 1;
    return window_left < 0 ? q_len
                           : min(q_len, last_k - offset + window_left + 1);
  }

  // Query tiles [*m_begin, *m_end) of block_m rows hold every query that
  // sees some key of the key tile [n0, n1); empty (0, 0) when none does.
  // The backward kernels walk these tiles for one key tile. Host-callable
  // too, for tests/csrc/check_dq_order.cu.
  __host__ __device__ __forceinline__ void query_tiles(int n0, int n1,
                                                       int block_m,
                                                       int* m_begin,
                                                       int* m_end) const {
    *m_begin = 0;
    *m_end = 0;
    if (n0 >= kv_len) return;
    const int q_begin = query_begin(n0), q_end = query_end(n1);
    if (q_begin < q_end) {
      *m_begin = q_begin / block_m;
      *m_end = ceil_div(q_end, block_m);
    }
  }

  // What query i sees by position (causal, window, lengths; segment 0): all
  // of its mask without segment ids. No key for a query past q_len.
  __device__ __forceinline__ MaskRow row_by_position(int i) const {
    MaskRow r;
    r.key_begin = key_begin(i);
    r.key_end = i >= q_len ? 0
        : window_right < 0 ? kv_len
                           : min(kv_len, i + offset + window_right + 1);
    r.segment = 0;
    return r;
  }

  // What query i sees; no key for a query past q_len.
  __device__ __forceinline__ MaskRow row(int i) const {
    MaskRow r = row_by_position(i);
    r.segment = has_segments() && i < q_len ? q_segment_ids[i] : 0;
    return r;
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
// log-domain logit of raw dot product `dot` at (i, j). Their derivatives sit
// beside them (Softcap::grad_from_output, Alibi::grad_slope).
struct ScoreMod {
  float scale;
  Softcap softcap;
  Alibi alibi;

  __device__ __forceinline__ static ScoreMod make(const FwdParams& p, int b,
                                                  int h,
                                                  const AttentionMask& mask) {
    return {p.softmax_scale, Softcap::make(p), Alibi::make(p, b, h, mask)};
  }
  // The logit; *capped receives it after softcap and before alibi, the
  // value softcap's derivative is taken from.
  __device__ __forceinline__ float operator()(float dot, int i, int j,
                                              float* capped) const {
    float x = dot * scale;
    if (softcap.enabled()) x = softcap(x);
    *capped = x;
    if (alibi.enabled()) x += alibi(i, j);
    return x;
  }
  __device__ __forceinline__ float operator()(float dot, int i, int j) const {
    float capped;
    return (*this)(dot, i, j, &capped);
  }
};

}  // namespace jax_flash
