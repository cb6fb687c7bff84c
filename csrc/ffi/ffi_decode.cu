// XLA FFI handler `JaxFlashDecode` (custom call target "jax_flash_decode"):
// a few query rows against a contiguous or paged K/V cache, split-KV (see
// csrc/sm80/flash_decode_kernel.h), and `jax_flash_decode_workspace_bytes`;
// see docs/ffi_contract.md.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "common/decode_params.h"
#include "ffi/decode_tensor_maps.h"
#include "ffi/ffi_common.h"
#include "kernel_list.h"
#include "sm80/decode_tile_size.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jax_flash {
namespace {

constexpr ffi::DataType kDtype_bf16 = ffi::DataType::BF16;
constexpr ffi::DataType kDtype_fp16 = ffi::DataType::F16;
constexpr const char* kTarget = "jax_flash_decode";

// Scratch of the split-KV partials, sized for the most splits any device
// gets for these shapes (decode_num_splits with kDecodeMaxSms).
struct DecodeWorkspace {
  int64_t out_floats = 0;  // (splits, B, H, Sq, D)
  int64_t lse_floats = 0;  // (splits, B, H, Sq)
  int64_t bytes = 0;

  static DecodeWorkspace make(int64_t B, int64_t H, int64_t Hkv, int64_t Sq,
                              int64_t D, int64_t capacity) {
    DecodeWorkspace w;
    const int splits = decode_num_splits(
        static_cast<int>(B), static_cast<int>(Hkv),
        static_cast<int>(H / (Hkv > 0 ? Hkv : 1) * Sq),
        static_cast<int>(capacity), kDecodeMaxSms);
    if (splits <= 1) return w;
    w.lse_floats = splits * B * H * Sq;
    w.out_floats = w.lse_floats * D;
    w.bytes = (w.out_floats + w.lse_floats) * 4;
    return w;
  }
};

ffi::Error DecodeImpl(cudaStream_t stream, ffi::AnyBuffer q,
                      ffi::AnyBuffer k_cache, ffi::AnyBuffer v_cache,
                      ffi::Buffer<ffi::S32> seq_lengths,
                      ffi::Buffer<ffi::S32> block_table,
                      ffi::Buffer<ffi::F32> alibi_slopes,
                      ffi::Result<ffi::AnyBuffer> out,
                      ffi::Result<ffi::Buffer<ffi::F32>> lse,
                      ffi::Result<ffi::Buffer<ffi::U8>> workspace,
                      float softmax_scale, int32_t window_left,
                      int32_t window_right, float softcap) {
  const auto qd = q.dimensions(), kd = k_cache.dimensions(),
             vd = v_cache.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4) {
    return ffi::Error::InvalidArgument(
        "jax_flash_decode: q, k_cache, v_cache must be 4-d; got " +
        shape_text(qd) + ", " + shape_text(kd) + ", " + shape_text(vd));
  }
  const ffi::DataType dtype = q.element_type();
  if ((dtype != kDtype_bf16 && dtype != kDtype_fp16) ||
      k_cache.element_type() != dtype || v_cache.element_type() != dtype ||
      out->element_type() != dtype) {
    return ffi::Error::InvalidArgument(
        "jax_flash_decode: q, k_cache, v_cache, out must share one dtype, "
        "bf16 or f16");
  }
  const int64_t B = qd[0], Sq = qd[1], H = qd[2], D = qd[3];
  const int64_t Hkv = kd[2];
  const bool paged = block_table.element_count() > 0;
  bool same = kd[3] == D && Hkv > 0 && H % Hkv == 0;
  for (size_t i = 0; i < 4; ++i) same = same && kd[i] == vd[i];
  if (!paged) same = same && kd[0] == B;
  if (!same) {
    return ffi::Error::InvalidArgument(
        "jax_flash_decode: inconsistent shapes q " + shape_text(qd) +
        ", k_cache " + shape_text(kd) + ", v_cache " + shape_text(vd) +
        " (need equal caches, H % Hkv == 0, D == Dv" +
        (paged ? ")" : ", and a cache row per batch row)"));
  }
  ffi::Error e = expect_shape(kTarget, "seq_lengths",
                              seq_lengths.dimensions(), {B});
  if (e.failure()) return e;
  const auto td = block_table.dimensions();
  if (paged && (td.size() != 2 || td[0] != B)) {
    return ffi::Error::InvalidArgument(
        "jax_flash_decode: block_table has shape " + shape_text(td) +
        ", expected (B, max_blocks) with B = " + std::to_string(B));
  }
  const void* slopes = nullptr;
  e = optional_operand(kTarget, "alibi_slopes", alibi_slopes, {B, H},
                       &slopes);
  if (e.failure()) return e;
  e = expect_shape(kTarget, "out", out->dimensions(), {B, Sq, H, D});
  if (e.success()) e = expect_shape(kTarget, "lse", lse->dimensions(),
                                    {B, H, Sq});
  if (e.failure()) return e;
  if (B == 0 || Sq == 0 || H == 0) return ffi::Error::Success();

  DecodeParams p;
  p.q = q.untyped_data();
  p.k = k_cache.untyped_data();
  p.v = v_cache.untyped_data();
  p.out = out->untyped_data();
  p.lse = lse->typed_data();
  // Dense row-major q and out (B, Sq, H, D); caches (rows, S, Hkv, D).
  p.q_row_stride = p.out_row_stride = H * D;
  p.q_head_stride = p.out_head_stride = D;
  p.q_batch_stride = p.out_batch_stride = Sq * H * D;
  p.kv_row_stride = Hkv * D;
  p.kv_head_stride = D;
  p.kv_batch_stride = kd[1] * Hkv * D;
  p.seq_lengths = seq_lengths.typed_data();
  if (paged) {
    p.block_table = block_table.typed_data();
    p.block_size = static_cast<int>(kd[1]);
    // Powers of two (the usual block sizes) index by shift and mask.
    if ((p.block_size & (p.block_size - 1)) == 0) {
      p.block_size_log2 = 0;
      while ((1 << p.block_size_log2) < p.block_size) ++p.block_size_log2;
    }
    p.max_blocks = static_cast<int>(td[1]);
    p.num_blocks = static_cast<int>(kd[0]);
    p.capacity = p.block_size * p.max_blocks;
  } else {
    p.capacity = static_cast<int>(kd[1]);
  }
  p.batch = static_cast<int>(B);
  p.seqlen_q = static_cast<int>(Sq);
  p.num_heads = static_cast<int>(H);
  p.num_heads_kv = static_cast<int>(Hkv);
  p.head_dim = static_cast<int>(D);
  p.softmax_scale = softmax_scale;
  p.softcap = softcap > 0.f ? softcap : 0.f;
  p.window_left = window_left < 0 ? -1 : window_left;
  p.window_right = window_right < 0 ? -1 : window_right;
  p.alibi_slopes = static_cast<const float*>(slopes);

  FwdParams device;  // the device's SM count and shared memory
  set_device_info(&device);
  p.arch = device.arch;
  p.num_sms = device.num_sms;
  p.max_smem_per_block = device.max_smem_per_block;
  const DecodeWorkspace layout =
      DecodeWorkspace::make(B, H, Hkv, Sq, D, p.capacity);
  p.num_splits = decode_num_splits(p.batch, p.num_heads_kv,
                                   p.num_heads / p.num_heads_kv * p.seqlen_q,
                                   p.capacity, p.num_sms);
  if (p.num_splits > 1) {
    if (static_cast<int64_t>(workspace->element_count()) < layout.bytes) {
      return ffi::Error::InvalidArgument(
          "jax_flash_decode: workspace of " +
          std::to_string(workspace->element_count()) + " bytes, need " +
          std::to_string(layout.bytes) +
          " (jax_flash_decode_workspace_bytes)");
    }
    p.partial_out = reinterpret_cast<float*>(workspace->untyped_data());
    p.partial_lse = p.partial_out + layout.out_floats;
  }

  make_kv_cache_tensor_maps(&p, dtype == kDtype_bf16);

  const char* kernel = nullptr;
  int smem_needed = 0;
#define JAX_FLASH_DISPATCH_DECODE(arch, T, tag, head_dim)             \
  if (kernel == nullptr && dtype == kDtype_##tag && D == head_dim) {  \
    smem_needed = run_mha_decode_<arch, T, head_dim>(p, stream);      \
    kernel = "flash_decode<sm" #arch ", " #tag ", " #head_dim ">";    \
  }
  JAX_FLASH_DECODE_KERNELS(JAX_FLASH_DISPATCH_DECODE)
#undef JAX_FLASH_DISPATCH_DECODE
  if (kernel == nullptr) {
    return ffi::Error::InvalidArgument(
        "jax_flash_decode: no kernel built for this dtype and head dim " +
        std::to_string(D) + " (see jax_flash_build_info)");
  }
  if (smem_needed > 0) {
    return shared_memory_error(std::string("jax_flash_decode: ") + kernel,
                               smem_needed, device);
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    return launch_error(std::string("jax_flash_decode: ") + kernel, err);
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jax_flash

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxFlashDecode, jax_flash::DecodeImpl,
    ffi::Ffi::Bind()
        .Ctx<ffi::PlatformStream<cudaStream_t>>()  // the computation's stream
        .Arg<ffi::AnyBuffer>()             // q (B, Sq, H, D) bf16/f16
        .Arg<ffi::AnyBuffer>()             // k_cache (B, S_max, Hkv, D) or
                                           //   (num_blocks, block_size, Hkv, D)
        .Arg<ffi::AnyBuffer>()             // v_cache, shaped as k_cache
        .Arg<ffi::Buffer<ffi::S32>>()      // seq_lengths (B,) valid keys
        .Arg<ffi::Buffer<ffi::S32>>()      // block_table (B, max_blocks) or (0,)
        .Arg<ffi::Buffer<ffi::F32>>()      // alibi_slopes (B, H) or (0,)
        .Ret<ffi::AnyBuffer>()             // out (B, Sq, H, D)
        .Ret<ffi::Buffer<ffi::F32>>()      // lse (B, H, Sq), natural log
        .Ret<ffi::Buffer<ffi::U8>>()       // workspace, split-KV partials
        .Attr<float>("softmax_scale")      // multiplies q.k first
        .Attr<int32_t>("window_left")      // -1 = unbounded
        .Attr<int32_t>("window_right")     // -1 = unbounded; causal = 0
        .Attr<float>("softcap"),           // 0 = off
    {ffi::Traits::kCmdBufferCompatible});

// Bytes of workspace `jax_flash_decode` needs for these shapes: q (B, Sq, H,
// D), Hkv K/V heads and a capacity of `capacity` keys per row.
extern "C" int64_t jax_flash_decode_workspace_bytes(int64_t B, int64_t Sq,
                                                    int64_t H, int64_t Hkv,
                                                    int64_t D,
                                                    int64_t capacity) {
  return jax_flash::DecodeWorkspace::make(B, H, Hkv, Sq, D, capacity).bytes;
}
