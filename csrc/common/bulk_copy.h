// The sm90 bulk-copy engine, as the backward kernel uses it: asynchronous
// float32 additions of contiguous shared-memory rows into global memory
// (cp.reduce.async.bulk), which the SM hands off instead of issuing one
// atomic per element from registers.
//
// kHasBulkCopy is true only in device code compiled for sm_90 or later; the
// helpers compile to nothing elsewhere, so callers test it first.
#pragma once

#include <cstdint>

namespace jax_flash {

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define JAX_FLASH_HAS_BULK_COPY 1
#else
#define JAX_FLASH_HAS_BULK_COPY 0
#endif
constexpr bool kHasBulkCopy = JAX_FLASH_HAS_BULK_COPY;

// Makes this thread's earlier shared-memory writes visible to the bulk-copy
// engine (the async proxy); a barrier must follow before another thread
// starts a copy that reads them.
__device__ __forceinline__ void fence_shared_for_bulk_copy() {
#if JAX_FLASH_HAS_BULK_COPY
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// *dst += *src elementwise for `bytes` / 4 floats (a multiple of 16 bytes;
// both addresses 16-byte aligned), asynchronously, in this thread's current
// bulk group.
__device__ __forceinline__ void bulk_add_f32(float* dst, uint32_t src_smem,
                                             uint32_t bytes) {
#if JAX_FLASH_HAS_BULK_COPY
  asm volatile(
      "cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 "
      "[%0], [%1], %2;\n"
      :: "l"(dst), "r"(src_smem), "r"(bytes) : "memory");
#endif
}

// Closes this thread's current bulk group.
__device__ __forceinline__ void bulk_commit() {
#if JAX_FLASH_HAS_BULK_COPY
  asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
#endif
}

// Waits until this thread's bulk groups, all but the newest kPending, have
// read their shared-memory sources (which may then be overwritten).
template <int kPending = 0>
__device__ __forceinline__ void bulk_wait_sources_read() {
#if JAX_FLASH_HAS_BULK_COPY
  asm volatile("cp.async.bulk.wait_group.read %0;\n" :: "n"(kPending)
               : "memory");
#endif
}

// Waits until this thread's bulk groups have completed.
__device__ __forceinline__ void bulk_wait_all() {
#if JAX_FLASH_HAS_BULK_COPY
  asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");
#endif
}

}  // namespace jax_flash
