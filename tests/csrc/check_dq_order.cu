// Host checks of the backward's deterministic dQ order (common/dq_order.h),
// through the functions the kernels call, for many masks and tile shapes:
// - order: for every query tile, the key tiles that see it (by
//   AttentionMask::query_tiles, the kernels' loop bounds) each wait for the
//   value the one above them stores, highest first, the first for 0;
// - progress: a simulated launch finishes. CTAs start in the kernels' grid
//   order (dq_order_key_tile), at most `resident` at a time, and walk their
//   steps (every query head of the group, each over its query tiles), each
//   step waiting for its tile's semaphore. A launch where no resident CTA
//   can move is a deadlock; every tile must end with all its contributors
//   having added, in order.
// Prints the number of mismatches and exits non-zero when there is any.
#include <algorithm>
#include <cstdio>
#include <vector>

#include "common/dq_order.h"
#include "common/mask.h"

namespace {

using jax_flash::AttentionMask;

AttentionMask make_mask(int q_len, int kv_len, int left, int right) {
  AttentionMask m{};
  m.q_len = q_len;
  m.kv_len = kv_len;
  m.offset = kv_len - q_len;
  m.window_left = left;
  m.window_right = right;
  m.q_segment_ids = nullptr;
  m.kv_segment_ids = nullptr;
  return m;
}

struct Shape {
  int seqlen_q, seqlen_k;  // the padded extents the grid is sized by
  int block_m, block_n;
  int group;  // query heads per K/V head
};

// Order: each contributor waits for the previous one's index + 1.
int order_mismatches(const AttentionMask& mask, const Shape& s) {
  const int num_m = jax_flash::ceil_div(s.seqlen_q, s.block_m);
  const int num_n = jax_flash::ceil_div(s.seqlen_k, s.block_n);
  int bad = 0;
  for (int m = 0; m < num_m; ++m) {
    int previous = -1;  // contributor above, in descending order
    for (int n = num_n - 1; n >= 0; --n) {
      int m_begin, m_end;
      mask.query_tiles(n * s.block_n, (n + 1) * s.block_n, s.block_m,
                       &m_begin, &m_end);
      if (m < m_begin || m >= m_end) continue;
      const int want = previous < 0 ? 0 : previous + 1;
      if (jax_flash::dq_order_ready_value(mask, n, num_n, s.block_n,
                                          s.block_m, m) != want) {
        ++bad;
      }
      previous = n;
    }
  }
  return bad;
}

// Progress: simulate a launch with `resident` CTAs at a time. Returns 1 on
// a deadlock or a wrong final count, else 0.
int progress_mismatches(const AttentionMask& mask, const Shape& s,
                        int resident) {
  const int num_m = jax_flash::ceil_div(s.seqlen_q, s.block_m);
  const int num_n = jax_flash::ceil_div(s.seqlen_k, s.block_n);
  struct Cta {
    int n, m_begin, m_end, step, steps;
  };
  std::vector<int> semaphore(s.group * num_m, 0);
  std::vector<int> adds(s.group * num_m, 0);
  std::vector<Cta> running;
  int launched = 0, done = 0;
  while (done < num_n) {
    while (static_cast<int>(running.size()) < resident && launched < num_n) {
      Cta c;
      c.n = jax_flash::dq_order_key_tile(launched++, num_n, true);
      mask.query_tiles(c.n * s.block_n, (c.n + 1) * s.block_n, s.block_m,
                       &c.m_begin, &c.m_end);
      c.step = 0;
      c.steps = s.group * (c.m_end - c.m_begin);
      running.push_back(c);
    }
    bool moved = false;
    for (size_t i = 0; i < running.size();) {
      Cta& c = running[i];
      if (c.step == c.steps) {
        running.erase(running.begin() + i);
        ++done;
        moved = true;
        continue;
      }
      const int per_head = c.m_end - c.m_begin;
      const int g = c.step / per_head, m = c.m_begin + c.step % per_head;
      int& sem = semaphore[g * num_m + m];
      if (sem == jax_flash::dq_order_ready_value(mask, c.n, num_n, s.block_n,
                                                 s.block_m, m)) {
        sem = c.n + 1;
        ++adds[g * num_m + m];
        ++c.step;
        moved = true;
      }
      ++i;
    }
    if (!moved) return 1;  // deadlock
  }
  // Every (head, query tile) got one addition per key tile that sees it.
  for (int m = 0; m < num_m; ++m) {
    int contributors = 0;
    for (int n = 0; n < num_n; ++n) {
      int m_begin, m_end;
      mask.query_tiles(n * s.block_n, (n + 1) * s.block_n, s.block_m,
                       &m_begin, &m_end);
      contributors += m >= m_begin && m < m_end;
    }
    for (int g = 0; g < s.group; ++g) {
      if (adds[g * num_m + m] != contributors) return 1;
    }
  }
  return 0;
}

}  // namespace

int main() {
  // (block_m, block_n): the sm90 kernel's, and the sm80 kernel's at D = 64,
  // D <= 128 and D > 128.
  const int tiles[][2] = {{64, 128}, {128, 128}, {64, 64}};
  // (seqlen_q, seqlen_k), and lengths below them.
  const int sizes[][2] = {{1, 1},     {17, 300},   {300, 17},  {700, 700},
                          {1000, 129}, {129, 1000}, {2048, 2048}};
  // (window_left, window_right): none, causal, causal + left, both, right.
  const int windows[][2] = {{-1, -1}, {-1, 0}, {100, 0}, {64, 8}, {-1, 200},
                            {0, 0}};
  int order_bad = 0, progress_bad = 0, cases = 0;
  for (const auto& t : tiles) {
    for (const auto& z : sizes) {
      for (const auto& w : windows) {
        for (int lengths = 0; lengths < 2; ++lengths) {
          const int q_len = lengths ? std::max(1, z[0] * 2 / 3) : z[0];
          const int kv_len = lengths ? std::max(1, z[1] / 2) : z[1];
          const AttentionMask mask = make_mask(q_len, kv_len, w[0], w[1]);
          for (int group : {1, 3}) {
            const Shape s{z[0], z[1], t[0], t[1], group};
            ++cases;
            order_bad += order_mismatches(mask, s);
            for (int resident : {1, 2, 7, 1000}) {
              progress_bad += progress_mismatches(mask, s, resident);
            }
          }
        }
      }
    }
  }
  std::printf("%d masks and shapes\n", cases);
  std::printf("dq order mismatches: %d\n", order_bad);
  std::printf("dq progress mismatches: %d\n", progress_bad);
  return order_bad + progress_bad == 0 ? 0 : 1;
}
