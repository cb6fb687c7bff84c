// XLA FFI handler of the backward pass, `jax_flash_bwd` (symbol JaxFlashBwd),
// and `jax_flash_bwd_workspace_bytes`; see docs/ffi_contract.md.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <type_traits>

#include "common/flash.h"
#include "ffi/ffi_common.h"
#include "kernel_list.h"
#include "sm80/flash_bwd_tile_size.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jax_flash {

namespace {

// Runs the compiled instantiation for (kernel_arch, dtype, head dim): false
// if there is none; *smem_needed as run_mha_bwd_ returns it.
bool dispatch_bwd(const BwdParams& p, int32_t kernel_arch, cudaStream_t stream,
                  int* smem_needed) {
#define JAX_FLASH_BWD_CASE(arch, T, dtype_tag, D)               \
  if (kernel_arch == arch &&                                    \
      p.is_bf16 == std::is_same_v<T, __nv_bfloat16> &&          \
      p.head_dim == D) {                                        \
    *smem_needed = run_mha_bwd_<arch, T, D>(p, stream);         \
    return true;                                                \
  }
  JAX_FLASH_BWD_KERNELS(JAX_FLASH_BWD_CASE)
#undef JAX_FLASH_BWD_CASE
  return false;
}

constexpr const char* kTarget = "jax_flash_bwd";

ffi::Error JaxFlashBwdImpl(
    cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
    ffi::AnyBuffer out, ffi::AnyBuffer dout, ffi::Buffer<ffi::F32> lse,
    ffi::Buffer<ffi::F32> alibi_slopes, ffi::Buffer<ffi::S32> q_segment_ids,
    ffi::Buffer<ffi::S32> kv_segment_ids, ffi::Buffer<ffi::S32> q_lengths,
    ffi::Buffer<ffi::S32> kv_lengths, ffi::Buffer<ffi::S32> position_offsets,
    ffi::Buffer<ffi::F32> dlse,
    ffi::Result<ffi::AnyBuffer> dq,
    ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> dv,
    ffi::Result<ffi::Buffer<ffi::F32>> dalibi,
    ffi::Result<ffi::Buffer<ffi::U8>> workspace, float softmax_scale,
    int32_t window_left, int32_t window_right, float softcap,
    int32_t kernel_arch, bool deterministic) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4) {
    return ffi::Error::InvalidArgument(
        "jax_flash_bwd: q, k, v must be (B, S, heads, D), got " +
        shape_text(qd) + ", " + shape_text(kd) + ", " + shape_text(vd));
  }
  const int64_t B = qd[0], Sq = qd[1], H = qd[2], D = qd[3];
  const int64_t Sk = kd[1], Hkv = kd[2], Dv = vd[3];
  const ffi::DataType dtype = q.element_type();
  if (dtype != ffi::DataType::BF16 && dtype != ffi::DataType::F16) {
    return ffi::Error::InvalidArgument("jax_flash_bwd: q must be bf16 or f16");
  }
  for (const ffi::AnyBuffer* t : {&k, &v, &out, &dout}) {
    if (t->element_type() != dtype) {
      return ffi::Error::InvalidArgument(
          "jax_flash_bwd: q, k, v, out, dout must share one dtype");
    }
  }
  if (Hkv <= 0 || H % Hkv != 0 || D != Dv) {
    return ffi::Error::InvalidArgument(
        "jax_flash_bwd: need H % Hkv == 0 and D == Dv, got q " +
        shape_text(qd) + ", k " + shape_text(kd) + ", v " + shape_text(vd));
  }
  ffi::Error e = expect_shape(kTarget, "k", kd, {B, Sk, Hkv, D});
  if (e.success()) e = expect_shape(kTarget, "v", vd, {B, Sk, Hkv, Dv});
  if (e.success()) {
    e = expect_shape(kTarget, "out", out.dimensions(), {B, Sq, H, Dv});
  }
  if (e.success()) {
    e = expect_shape(kTarget, "dout", dout.dimensions(), {B, Sq, H, Dv});
  }
  if (e.success()) {
    e = expect_shape(kTarget, "lse", lse.dimensions(), {B, H, Sq});
  }
  if (e.failure()) return e;

  BwdParams p;
  p.q = q.untyped_data();
  p.k = k.untyped_data();
  p.v = v.untyped_data();
  p.out = const_cast<void*>(out.untyped_data());
  p.dout = dout.untyped_data();
  p.lse = const_cast<float*>(lse.typed_data());
  p.dq = dq->untyped_data();
  p.dk = dk->untyped_data();
  p.dv = dv->untyped_data();
  // Dense (B, S, heads, D) strides, in elements.
  p.q_batch_stride = p.dq_batch_stride = Sq * H * D;
  p.q_row_stride = p.dq_row_stride = H * D;
  p.q_head_stride = p.dq_head_stride = D;
  p.k_batch_stride = p.dk_batch_stride = Sk * Hkv * D;
  p.k_row_stride = p.dk_row_stride = Hkv * D;
  p.k_head_stride = p.dk_head_stride = D;
  p.v_batch_stride = p.dv_batch_stride = Sk * Hkv * Dv;
  p.v_row_stride = p.dv_row_stride = Hkv * Dv;
  p.v_head_stride = p.dv_head_stride = Dv;
  p.out_batch_stride = p.dout_batch_stride = Sq * H * Dv;
  p.out_row_stride = p.dout_row_stride = H * Dv;
  p.out_head_stride = p.dout_head_stride = Dv;
  p.batch = static_cast<int>(B);
  p.seqlen_q = static_cast<int>(Sq);
  p.seqlen_k = static_cast<int>(Sk);
  p.num_heads = static_cast<int>(H);
  p.num_heads_kv = static_cast<int>(Hkv);
  p.head_dim = static_cast<int>(D);
  p.softmax_scale = softmax_scale;
  p.softmax_scale_log2 = softmax_scale * kLog2e;
  p.window_left = window_left;
  p.window_right = window_right;
  p.softcap = softcap;
  p.is_bf16 = dtype == ffi::DataType::BF16;
  p.deterministic = deterministic;

  e = read_mask_operands(kTarget, B, H, Sq, Sk, alibi_slopes, q_segment_ids,
                         kv_segment_ids, q_lengths, kv_lengths,
                         position_offsets, &p);
  const void* data = nullptr;
  if (e.success()) {
    e = optional_operand(kTarget, "dlse", dlse, {B, H, Sq}, &data);
    p.dlse = static_cast<const float*>(data);
  }
  if (e.failure()) return e;
  if (p.alibi_slopes != nullptr) {
    e = expect_shape(kTarget, "dalibi", dalibi->dimensions(), {B, H});
    if (e.failure()) return e;
    p.dalibi = dalibi->typed_data();
  }

  const BwdWorkspaceLayout layout =
      BwdWorkspaceLayout::make(B, Sq, H, D, deterministic);
  if (static_cast<int64_t>(workspace->element_count()) < layout.total) {
    return ffi::Error::InvalidArgument(
        "jax_flash_bwd: workspace of " +
        std::to_string(workspace->element_count()) + " bytes, need " +
        std::to_string(layout.total));
  }
  p.workspace = workspace->untyped_data();
  p.workspace_bytes = layout.total;
  if (B == 0 || Sq == 0 || H == 0) return ffi::Error::Success();

  set_device_info(&p);
  e = check_kernel_arch(kTarget, kernel_arch, p);
  if (e.failure()) return e;

  const std::string what = std::string("jax_flash_bwd (sm") +
                           std::to_string(kernel_arch) + ", " +
                           (p.is_bf16 ? "bf16" : "fp16") + ", D=" +
                           std::to_string(D) + ")";
  int smem_needed = 0;
  if (!dispatch_bwd(p, kernel_arch, stream, &smem_needed)) {
    return ffi::Error::InvalidArgument(what + ": not compiled in this build");
  }
  if (smem_needed > 0) return shared_memory_error(what, smem_needed, p);
  const cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) {
    return launch_error(what + ": bwd_preprocess_kernel / flash_bwd_kernel / "
                        "bwd_convert_dq_kernel", status);
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jax_flash

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxFlashBwd, jax_flash::JaxFlashBwdImpl,
    ffi::Ffi::Bind()
        .Ctx<ffi::PlatformStream<cudaStream_t>>()  // stream of the call
        .Arg<ffi::AnyBuffer>()            // q (B, Sq, H, D) T
        .Arg<ffi::AnyBuffer>()            // k (B, Sk, Hkv, D) T
        .Arg<ffi::AnyBuffer>()            // v (B, Sk, Hkv, Dv) T
        .Arg<ffi::AnyBuffer>()            // out (B, Sq, H, Dv) T
        .Arg<ffi::AnyBuffer>()            // dout (B, Sq, H, Dv) T
        .Arg<ffi::Buffer<ffi::F32>>()     // lse (B, H, Sq), natural log
        .Arg<ffi::Buffer<ffi::F32>>()     // alibi_slopes (B, H) or (0,)
        .Arg<ffi::Buffer<ffi::S32>>()     // q_segment_ids (B, Sq) or (0,)
        .Arg<ffi::Buffer<ffi::S32>>()     // kv_segment_ids (B, Sk) or (0,)
        .Arg<ffi::Buffer<ffi::S32>>()     // q_lengths (B,) or (0,)
        .Arg<ffi::Buffer<ffi::S32>>()     // kv_lengths (B,) or (0,)
        .Arg<ffi::Buffer<ffi::S32>>()     // position_offsets (B,) or (0,)
        .Arg<ffi::Buffer<ffi::F32>>()     // dlse (B, H, Sq) or (0,)
        .Ret<ffi::AnyBuffer>()            // dq, shape and dtype of q
        .Ret<ffi::AnyBuffer>()            // dk, shape and dtype of k
        .Ret<ffi::AnyBuffer>()            // dv, shape and dtype of v
        .Ret<ffi::Buffer<ffi::F32>>()     // dalibi (B, H) or (0,)
        .Ret<ffi::Buffer<ffi::U8>>()      // workspace, scratch bytes
        .Attr<float>("softmax_scale")     // multiplies q.k first
        .Attr<int32_t>("window_left")     // -1 = unbounded
        .Attr<int32_t>("window_right")    // -1 = unbounded; causal is 0
        .Attr<float>("softcap")           // 0 = off
        .Attr<int32_t>("kernel_arch")     // 80 or 90: the kernels to run
        .Attr<bool>("deterministic"),     // bitwise reproducible gradients
    {ffi::Traits::kCmdBufferCompatible});

extern "C" int64_t jax_flash_bwd_workspace_bytes(int64_t B, int64_t Sq,
                                                 int64_t Sk, int64_t H,
                                                 int64_t Hkv, int64_t D,
                                                 int64_t Dv,
                                                 int32_t deterministic) {
  // No scratch depends on Sk or Hkv: GQA groups are summed inside a CTA and
  // dalibi is collected per query row. D == Dv (docs/ffi_contract.md).
  (void)Sk;
  (void)Hkv;
  (void)Dv;
  return jax_flash::BwdWorkspaceLayout::make(B, Sq, H, D, deterministic != 0)
      .total;
}
