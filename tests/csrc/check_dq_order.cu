// Host checks of the backward's deterministic dQ order (common/dq_order.h),
// through the functions the kernels call, for many masks and tile shapes:
// - order: for every query tile, the key tiles that see it (by
//   AttentionMask::query_tiles, the kernels' loop bounds) each wait for the
//   value their predecessor stores, the first for 0. Descending order:
//   highest first. Cyclic order (masks without a window): in the order the
//   tiles reach it when all start together, each at
//   dq_order_first_tile, ties broken highest first.
// - progress: a simulated launch finishes. CTAs of several (b, h_kv)
//   groups start in the kernels' grid order (dq_order_key_tile), at most
//   `resident` at a time, and walk their steps (every query head of the
//   group, each over its query tiles from the first the order gives),
//   each step waiting for its tile's semaphore. A launch where no resident
//   CTA can move is a deadlock; every tile must end with all its
//   contributors having added, in order. The launch asks for the order of
//   resident groups only when `resident` holds a whole group; so does the
//   simulation.
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

// The query tile key tile n visits at step i of a head, and the semaphore
// value it waits for there, in the order `tiles_resident` selects.
struct Walk {
  int m_begin, m_end, first;
  bool cyclic;
  int tile(int i) const {
    const int count = m_end - m_begin;
    return m_begin + (first - m_begin + i) % count;
  }
};

Walk make_walk(const AttentionMask& mask, const Shape& s, int n,
               bool tiles_resident) {
  Walk w;
  mask.query_tiles(n * s.block_n, (n + 1) * s.block_n, s.block_m,
                   &w.m_begin, &w.m_end);
  w.cyclic = jax_flash::dq_order_cyclic(mask, tiles_resident);
  w.first = jax_flash::dq_order_first_tile(mask, w.cyclic, n, s.block_n,
                                           w.m_begin, w.m_end);
  return w;
}

int ready_value(const AttentionMask& mask, const Shape& s, const Walk& w,
                int n, int m) {
  const int num_n = jax_flash::ceil_div(s.seqlen_k, s.block_n);
  return w.cyclic
      ? jax_flash::dq_order_cyclic_ready_value(mask, n, s.block_n, s.block_m,
                                               m)
      : jax_flash::dq_order_ready_value(mask, n, num_n, s.block_n,
                                        s.block_m, m);
}

// Order: each contributor waits for the previous one's index + 1, the
// previous one being the one above it (descending) or the one that reaches
// the tile at an earlier step, or the same step and above it (cyclic).
int order_mismatches(const AttentionMask& mask, const Shape& s,
                     bool tiles_resident) {
  const int num_m = jax_flash::ceil_div(s.seqlen_q, s.block_m);
  const int num_n = jax_flash::ceil_div(s.seqlen_k, s.block_n);
  int bad = 0;
  for (int m = 0; m < num_m; ++m) {
    struct Visit {
      int step, n;
    };
    std::vector<Visit> visits;
    for (int n = num_n - 1; n >= 0; --n) {
      const Walk w = make_walk(mask, s, n, tiles_resident);
      if (m < w.m_begin || m >= w.m_end) continue;
      const int count = w.m_end - w.m_begin;
      const int step = w.cyclic ? (m - w.first + count) % count : 0;
      visits.push_back({step, n});
    }
    std::stable_sort(visits.begin(), visits.end(),
                     [](const Visit& a, const Visit& b) {
                       return a.step < b.step;
                     });
    int previous = -1;
    for (const Visit& v : visits) {
      const Walk w = make_walk(mask, s, v.n, tiles_resident);
      const int want = previous < 0 ? 0 : previous + 1;
      if (ready_value(mask, s, w, v.n, m) != want) ++bad;
      previous = v.n;
    }
  }
  return bad;
}

// Progress: simulate a launch of `groups` (b, h_kv) groups with `resident`
// CTAs at a time. Returns 1 on a deadlock or a wrong final count, else 0.
int progress_mismatches(const AttentionMask& mask, const Shape& s,
                        int resident, bool tiles_resident, int groups) {
  const int num_m = jax_flash::ceil_div(s.seqlen_q, s.block_m);
  const int num_n = jax_flash::ceil_div(s.seqlen_k, s.block_n);
  struct Cta {
    int group, n, step, steps;
    Walk walk;
  };
  const int heads = groups * s.group;  // query heads, each its semaphores
  std::vector<int> semaphore(heads * num_m, 0);
  std::vector<int> adds(heads * num_m, 0);
  std::vector<Cta> running;
  int launched = 0, done = 0;
  const int total = groups * num_n;
  while (done < total) {
    while (static_cast<int>(running.size()) < resident && launched < total) {
      Cta c;
      c.group = launched / num_n;
      c.n = jax_flash::dq_order_key_tile(launched % num_n, num_n,
                                         !tiles_resident);
      ++launched;
      c.walk = make_walk(mask, s, c.n, tiles_resident);
      c.step = 0;
      c.steps = s.group * (c.walk.m_end - c.walk.m_begin);
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
      const int per_head = c.walk.m_end - c.walk.m_begin;
      const int head = c.group * s.group + c.step / per_head;
      const int m = c.walk.tile(c.step % per_head);
      int& sem = semaphore[head * num_m + m];
      if (sem == ready_value(mask, s, c.walk, c.n, m)) {
        sem = c.n + 1;
        ++adds[head * num_m + m];
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
    for (int head = 0; head < heads; ++head) {
      if (adds[head * num_m + m] != contributors) return 1;
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
  int order_bad = 0, progress_bad = 0, cases = 0, cyclic_cases = 0;
  for (const auto& t : tiles) {
    for (const auto& z : sizes) {
      for (const auto& w : windows) {
        for (int lengths = 0; lengths < 2; ++lengths) {
          const int q_len = lengths ? std::max(1, z[0] * 2 / 3) : z[0];
          const int kv_len = lengths ? std::max(1, z[1] / 2) : z[1];
          const AttentionMask mask = make_mask(q_len, kv_len, w[0], w[1]);
          const int num_n = jax_flash::ceil_div(z[1], t[1]);
          for (int group : {1, 3}) {
            const Shape s{z[0], z[1], t[0], t[1], group};
            ++cases;
            cyclic_cases += jax_flash::dq_order_cyclic(mask, true);
            for (bool tiles_resident : {false, true}) {
              order_bad += order_mismatches(mask, s, tiles_resident);
              // The launch asks for resident groups only when a group fits.
              const int smallest = tiles_resident ? num_n : 1;
              for (int resident : {1, 2, 7, num_n + 1, 1000}) {
                if (resident < smallest) continue;
                for (int groups : {1, 3}) {
                  progress_bad += progress_mismatches(mask, s, resident,
                                                      tiles_resident, groups);
                }
              }
              if (tiles_resident) {
                progress_bad += progress_mismatches(mask, s, num_n, true, 3);
              }
            }
          }
        }
      }
    }
  }
  std::printf("%d masks and shapes, %d of them in the cyclic order\n", cases,
              cyclic_cases);
  std::printf("dq order mismatches: %d\n", order_bad);
  std::printf("dq progress mismatches: %d\n", progress_bad);
  return order_bad + progress_bad == 0 ? 0 : 1;
}
