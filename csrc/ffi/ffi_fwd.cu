// XLA FFI handler `JaxFlashFwd` (custom call target "jax_flash_fwd"): checks
// the operands against docs/ffi_contract.md, fills FwdParams and launches the
// forward kernel compiled for the chosen arch and the operands' dtype and
// head dim; and `jax_flash_fwd_workspace_bytes`.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "common/flash.h"
#include "ffi/ffi_common.h"
#include "kernel_list.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jax_flash {
namespace {

constexpr ffi::DataType kDtype_bf16 = ffi::DataType::BF16;
constexpr ffi::DataType kDtype_fp16 = ffi::DataType::F16;
constexpr const char* kTarget = "jax_flash_fwd";

ffi::Error FwdImpl(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k,
                   ffi::AnyBuffer v, ffi::Buffer<ffi::F32> alibi_slopes,
                   ffi::Buffer<ffi::S32> q_segment_ids,
                   ffi::Buffer<ffi::S32> kv_segment_ids,
                   ffi::Buffer<ffi::S32> q_lengths,
                   ffi::Buffer<ffi::S32> kv_lengths,
                   ffi::Buffer<ffi::S32> position_offsets,
                   ffi::Result<ffi::AnyBuffer> out,
                   ffi::Result<ffi::Buffer<ffi::F32>> lse,
                   ffi::Result<ffi::Buffer<ffi::U8>> workspace,
                   float softmax_scale, int32_t window_left,
                   int32_t window_right, float softcap,
                   int32_t kernel_arch) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4) {
    return ffi::Error::InvalidArgument(
        "jax_flash_fwd: q, k, v must be (B, S, heads, D); got " +
        shape_text(qd) + ", " + shape_text(kd) + ", " + shape_text(vd));
  }
  const ffi::DataType dtype = q.element_type();
  if ((dtype != kDtype_bf16 && dtype != kDtype_fp16) ||
      k.element_type() != dtype || v.element_type() != dtype ||
      out->element_type() != dtype) {
    return ffi::Error::InvalidArgument(
        "jax_flash_fwd: q, k, v, out must share one dtype, bf16 or f16");
  }
  const int64_t B = qd[0], Sq = qd[1], H = qd[2], D = qd[3];
  const int64_t Sk = kd[1], Hkv = kd[2], Dv = vd[3];
  if (kd[0] != B || vd[0] != B || vd[1] != Sk || vd[2] != Hkv || kd[3] != D ||
      Hkv == 0 || H % Hkv != 0 || D != Dv) {
    return ffi::Error::InvalidArgument(
        "jax_flash_fwd: inconsistent shapes q " + shape_text(qd) + ", k " +
        shape_text(kd) + ", v " + shape_text(vd) +
        " (need H % Hkv == 0 and D == Dv)");
  }
  const auto od = out->dimensions(), ld = lse->dimensions();
  if (od.size() != 4 || od[0] != B || od[1] != Sq || od[2] != H ||
      od[3] != Dv || ld.size() != 3 || ld[0] != B || ld[1] != H ||
      ld[2] != Sq) {
    return ffi::Error::InvalidArgument(
        "jax_flash_fwd: results must be out (B, Sq, H, Dv), lse (B, H, Sq); "
        "got " + shape_text(od) + ", " + shape_text(ld));
  }
  FwdParams p;
  ffi::Error e =
      read_mask_operands(kTarget, B, H, Sq, Sk, alibi_slopes, q_segment_ids,
                         kv_segment_ids, q_lengths, kv_lengths,
                         position_offsets, &p);
  if (e.failure()) return e;
  if (B == 0 || Sq == 0 || H == 0) return ffi::Error::Success();

  p.q = q.untyped_data();
  p.k = k.untyped_data();
  p.v = v.untyped_data();
  p.out = out->untyped_data();
  p.lse = lse->typed_data();
  // Dense row-major (B, S, heads, D).
  p.q_row_stride = H * D;
  p.q_head_stride = D;
  p.q_batch_stride = Sq * H * D;
  p.k_row_stride = Hkv * D;
  p.k_head_stride = D;
  p.k_batch_stride = Sk * Hkv * D;
  p.v_row_stride = Hkv * Dv;
  p.v_head_stride = Dv;
  p.v_batch_stride = Sk * Hkv * Dv;
  p.out_row_stride = H * Dv;
  p.out_head_stride = Dv;
  p.out_batch_stride = Sq * H * Dv;
  p.batch = static_cast<int>(B);
  p.seqlen_q = static_cast<int>(Sq);
  p.seqlen_k = static_cast<int>(Sk);
  p.num_heads = static_cast<int>(H);
  p.num_heads_kv = static_cast<int>(Hkv);
  p.head_dim = static_cast<int>(D);
  p.softmax_scale = softmax_scale;
  p.softmax_scale_log2 = softmax_scale * kLog2e;
  p.window_left = window_left < 0 ? -1 : window_left;
  p.window_right = window_right < 0 ? -1 : window_right;
  p.softcap = softcap > 0.f ? softcap : 0.f;
  p.is_bf16 = dtype == kDtype_bf16;
  set_device_info(&p);
  e = check_kernel_arch(kTarget, kernel_arch, p);
  if (e.failure()) return e;
  if (workspace->size_bytes() < kFwdWorkspaceBytes) {
    return ffi::Error::InvalidArgument(
        "jax_flash_fwd: workspace must be (" +
        std::to_string(kFwdWorkspaceBytes) + ",) uint8; got " +
        shape_text(workspace->dimensions()));
  }
  p.tile_counter = static_cast<int*>(workspace->untyped_data());

  const char* kernel = nullptr;
  int smem_needed = 0;
#define JAX_FLASH_DISPATCH_FWD(arch, T, tag, head_dim)                    \
  if (kernel == nullptr && kernel_arch == arch && dtype == kDtype_##tag && \
      D == head_dim) {                                                    \
    smem_needed = run_mha_fwd_<arch, T, head_dim>(p, stream);             \
    kernel = "flash_fwd<sm" #arch ", " #tag ", " #head_dim ">";           \
  }
  JAX_FLASH_FWD_KERNELS(JAX_FLASH_DISPATCH_FWD)
#undef JAX_FLASH_DISPATCH_FWD
  if (kernel == nullptr) {
    return ffi::Error::InvalidArgument(
        "jax_flash_fwd: no sm" + std::to_string(kernel_arch) +
        " kernel built for this dtype and head dim " + std::to_string(D) +
        " (see jax_flash_build_info)");
  }
  if (smem_needed > 0) {
    return shared_memory_error(std::string("jax_flash_fwd: ") + kernel,
                               smem_needed, p);
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    return launch_error(std::string("jax_flash_fwd: ") + kernel, err);
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jax_flash

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxFlashFwd, jax_flash::FwdImpl,
    ffi::Ffi::Bind()
        .Ctx<ffi::PlatformStream<cudaStream_t>>()  // the computation's stream
        .Arg<ffi::AnyBuffer>()             // q (B, Sq, H, D) bf16/f16
        .Arg<ffi::AnyBuffer>()             // k (B, Sk, Hkv, D)
        .Arg<ffi::AnyBuffer>()             // v (B, Sk, Hkv, Dv)
        .Arg<ffi::Buffer<ffi::F32>>()      // alibi_slopes (B, H) or (0,)
        .Arg<ffi::Buffer<ffi::S32>>()      // q_segment_ids (B, Sq) or (0,)
        .Arg<ffi::Buffer<ffi::S32>>()      // kv_segment_ids (B, Sk) or (0,)
        .Arg<ffi::Buffer<ffi::S32>>()      // q_lengths (B,) or (0,)
        .Arg<ffi::Buffer<ffi::S32>>()      // kv_lengths (B,) or (0,)
        .Arg<ffi::Buffer<ffi::S32>>()      // position_offsets (B,) or (0,)
        .Ret<ffi::AnyBuffer>()             // out (B, Sq, H, Dv)
        .Ret<ffi::Buffer<ffi::F32>>()      // lse (B, H, Sq), natural log
        .Ret<ffi::Buffer<ffi::U8>>()       // workspace (kFwdWorkspaceBytes,)
        .Attr<float>("softmax_scale")      // multiplies q.k first
        .Attr<int32_t>("window_left")      // -1 = unbounded
        .Attr<int32_t>("window_right")     // -1 = unbounded; causal = 0
        .Attr<float>("softcap")            // 0 = off
        .Attr<int32_t>("kernel_arch"),     // 80 or 90: the kernels to run
    {ffi::Traits::kCmdBufferCompatible});

extern "C" int64_t jax_flash_fwd_workspace_bytes() {
  return jax_flash::kFwdWorkspaceBytes;
}
