// Host checks of the sm90 backward's hand-derived addresses, for every
// consumer thread, through the same functions the kernel calls:
// - dS^T stores: for both buffers and every element pair a thread stores,
//   the address BwdKernelTraits::ds_store_base and ds_store_offset give
//   equals the byte offset cute's SmemLayoutDsT gives that (key, query)
//   position of MmaSdP's accumulator;
// - dQ tile order: the float a thread stores for each value of its MmaDq
//   accumulator (dq_tile_index, bwd_dq_tile.h) is the one dq_tile_position
//   (read by the convert kernel) names that value's (query, column).
// Prints the number of mismatches and exits non-zero when there is any.
#include <cstdint>
#include <cstdio>

#include <cute/tensor.hpp>

#include "sm90/bwd_dq_tile.h"
#include "sm90/flash_bwd_kernel_traits.h"
#include "sm90/softmax.h"

template <typename T>
int ds_mismatches() {
  using namespace cute;
  using Traits = jax_flash::sm90::BwdKernelTraits<T, 128>;
  using Element = typename Traits::Element;
  typename Traits::MmaSdP mma;
  alignas(1024) static Element tile[cosize_v<typename Traits::SmemLayoutDs>];
  Tensor sDsT = make_tensor(make_smem_ptr(tile), typename Traits::SmemLayoutDsT{});
  int bad = 0;
  for (int tid = 0; tid < Traits::kConsumerThreads; ++tid) {
    Tensor mine = mma.get_thread_slice(tid).partition_C(sDsT);
    const uint32_t base = Traits::ds_store_base(tid);
    for (int buffer = 0; buffer < 2; ++buffer) {
      Tensor dst = mine(_, _, _, buffer);
      Tensor rc = make_tensor(dst.data(),
                              jax_flash::sm90::accumulator_rows_cols(dst.layout()));
      for (int r = 0; r < size<0>(rc); ++r) {
        for (int c = 0; c < size<1>(rc); c += 2) {
          const auto want = static_cast<uint32_t>(
              reinterpret_cast<const char*>(&rc(r, c)) -
              reinterpret_cast<const char*>(tile));
          const uint32_t got = Traits::ds_store_offset(
              base + buffer * Traits::kDsBufferBytes, r, c / 2);
          if (want != got && ++bad <= 5) {
            std::printf("thread %d buffer %d (%d, %d): layout %u, kernel %u\n",
                        tid, buffer, r, c, want, got);
          }
        }
      }
    }
  }
  return bad;
}

template <typename T, int kHeadDim>
int dq_mismatches() {
  using namespace cute;
  using Traits = jax_flash::sm90::BwdKernelTraits<T, kHeadDim>;
  typename Traits::MmaDq mma;
  using TileDq = Shape<Int<Traits::kBlockM>, Int<kHeadDim>>;
  int bad = 0;
  for (int tid = 0; tid < Traits::kConsumerThreads; ++tid) {
    Tensor coords = mma.get_thread_slice(tid).partition_C(
        make_identity_tensor(TileDq{}));
    const int wg = tid / 128, wg_tid = tid % 128;
    for (int v = 0; v < size(coords); ++v) {
      // As the kernel stores acc_dq(v): float4 v / 4 of its half.
      const int f =
          jax_flash::sm90::dq_tile_index<kHeadDim>(wg, v / 4, wg_tid) + v % 4;
      int row, col;
      jax_flash::sm90::dq_tile_position<kHeadDim>(f, &row, &col);
      if ((row != get<0>(coords(v)) || col != get<1>(coords(v))) &&
          ++bad <= 5) {
        std::printf("thread %d value %d: accumulator (%d, %d), tile order "
                    "(%d, %d)\n", tid, v, int(get<0>(coords(v))),
                    int(get<1>(coords(v))), row, col);
      }
    }
  }
  return bad;
}

int main() {
  const int ds = ds_mismatches<__nv_bfloat16>() + ds_mismatches<__half>();
  const int dq = dq_mismatches<__nv_bfloat16, 128>() +
                 dq_mismatches<__half, 128>() +
                 dq_mismatches<__nv_bfloat16, 64>();
  std::printf("dS^T store address mismatches: %d\n", ds);
  std::printf("dQ tile order mismatches: %d\n", dq);
  return ds == 0 && dq == 0 ? 0 : 1;
}
