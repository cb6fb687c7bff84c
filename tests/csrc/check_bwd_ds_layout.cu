// Host check of the sm90 backward's dS^T store addresses: for every consumer
// thread, both buffers and every element pair it stores, the address the
// kernel derives from one base per thread (flash_bwd_kernel.h,
// ds_store_base) equals the byte offset cute's SmemLayoutDsT gives that
// (key, query) position of MmaSdP's accumulator. Prints the number of
// mismatches and exits non-zero when there is any.
#include <cstdint>
#include <cstdio>

#include <cute/tensor.hpp>

#include "sm90/flash_bwd_kernel_traits.h"
#include "sm90/softmax.h"

template <typename T>
int mismatches() {
  using namespace cute;
  using Traits = jax_flash::sm90::BwdKernelTraits<T, 128>;
  using Element = typename Traits::Element;
  typename Traits::MmaSdP mma;
  alignas(1024) static Element tile[cosize_v<typename Traits::SmemLayoutDs>];
  Tensor sDsT = make_tensor(make_smem_ptr(tile), typename Traits::SmemLayoutDsT{});
  int bad = 0;
  for (int tid = 0; tid < Traits::kConsumerThreads; ++tid) {
    Tensor mine = mma.get_thread_slice(tid).partition_C(sDsT);
    const int lane = tid % 32, k0 = (tid / 32) * 16 + lane / 4;
    const uint32_t base = (k0 * 128 + 4 * (lane % 4)) ^ ((k0 % 8) << 4);
    for (int buffer = 0; buffer < 2; ++buffer) {
      Tensor dst = mine(_, _, _, buffer);
      Tensor rc = make_tensor(dst.data(),
                              jax_flash::sm90::accumulator_rows_cols(dst.layout()));
      for (int r = 0; r < size<0>(rc); ++r) {
        for (int c = 0; c < size<1>(rc); c += 2) {
          const auto want = static_cast<uint32_t>(
              reinterpret_cast<const char*>(&rc(r, c)) -
              reinterpret_cast<const char*>(tile));
          const uint32_t got =
              (base + buffer * Traits::kDsBufferBytes + r * 1024) ^ (16 * (c / 2));
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

int main() {
  const int bad = mismatches<__nv_bfloat16>() + mismatches<__half>();
  std::printf("dS^T store address mismatches: %d\n", bad);
  return bad == 0 ? 0 : 1;
}
