// XLA FFI handler `JaxFlashFwd` (custom call target "jax_flash_fwd"): checks
// the operands against docs/ffi_contract.md, fills FwdParams and launches the
// forward kernel compiled for the operands' dtype and head dim.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <string>

#include "flash.h"
#include "kernel_list.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jax_flash {
namespace {

constexpr ffi::DataType kDtype_bf16 = ffi::DataType::BF16;
constexpr ffi::DataType kDtype_fp16 = ffi::DataType::F16;

std::string shape_str(ffi::AnyBuffer::Dimensions dims) {
  std::string s = "(";
  for (size_t i = 0; i < dims.size(); ++i) {
    s += (i ? ", " : "") + std::to_string(dims[i]);
  }
  return s + (dims.size() == 1 ? ",)" : ")");
}

// An optional operand is either empty, shape (0,), or exactly `want`.
template <typename Buffer>
ffi::Error check_optional(const Buffer& buf, std::initializer_list<int64_t>
                          want, const char* name, bool* present) {
  const auto dims = buf.dimensions();
  *present = !(dims.size() == 1 && dims[0] == 0);
  if (!*present) return ffi::Error::Success();
  bool ok = dims.size() == want.size();
  for (size_t i = 0; ok && i < want.size(); ++i) {
    ok = dims[i] == want.begin()[i];
  }
  if (!ok) {
    return ffi::Error::InvalidArgument(std::string("jax_flash_fwd: ") + name +
                                       " has shape " + shape_str(dims));
  }
  return ffi::Error::Success();
}

// Device properties, read once per device.
struct DeviceInfo {
  int arch = 0;
  int num_sms = 0;
};

DeviceInfo device_info() {
  constexpr int kMaxDevices = 64;
  static DeviceInfo cache[kMaxDevices];
  int device = 0;
  cudaGetDevice(&device);
  if (device < 0 || device >= kMaxDevices) device = 0;
  DeviceInfo& info = cache[device];
  if (info.arch == 0) {
    int major = 0, minor = 0, sms = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    info.num_sms = sms;
    info.arch = major * 10 + minor;
  }
  return info;
}

ffi::Error FwdImpl(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k,
                   ffi::AnyBuffer v, ffi::Buffer<ffi::F32> alibi_slopes,
                   ffi::Buffer<ffi::S32> q_segment_ids,
                   ffi::Buffer<ffi::S32> kv_segment_ids,
                   ffi::Buffer<ffi::S32> q_lengths,
                   ffi::Buffer<ffi::S32> kv_lengths,
                   ffi::Result<ffi::AnyBuffer> out,
                   ffi::Result<ffi::Buffer<ffi::F32>> lse,
                   float softmax_scale, int32_t window_left,
                   int32_t window_right, float softcap) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4) {
    return ffi::Error::InvalidArgument(
        "jax_flash_fwd: q, k, v must be (B, S, heads, D); got " +
        shape_str(qd) + ", " + shape_str(kd) + ", " + shape_str(vd));
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
        "jax_flash_fwd: inconsistent shapes q " + shape_str(qd) + ", k " +
        shape_str(kd) + ", v " + shape_str(vd) +
        " (need H % Hkv == 0 and D == Dv)");
  }
  const auto od = out->dimensions(), ld = lse->dimensions();
  if (od.size() != 4 || od[0] != B || od[1] != Sq || od[2] != H ||
      od[3] != Dv || ld.size() != 3 || ld[0] != B || ld[1] != H ||
      ld[2] != Sq) {
    return ffi::Error::InvalidArgument(
        "jax_flash_fwd: results must be out (B, Sq, H, Dv), lse (B, H, Sq); "
        "got " + shape_str(od) + ", " + shape_str(ld));
  }
  bool has_alibi, has_q_seg, has_kv_seg, has_q_len, has_kv_len;
  if (auto e = check_optional(alibi_slopes, {B, H}, "alibi_slopes",
                              &has_alibi); e.failure()) return e;
  if (auto e = check_optional(q_segment_ids, {B, Sq}, "q_segment_ids",
                              &has_q_seg); e.failure()) return e;
  if (auto e = check_optional(kv_segment_ids, {B, Sk}, "kv_segment_ids",
                              &has_kv_seg); e.failure()) return e;
  if (auto e = check_optional(q_lengths, {B}, "q_lengths", &has_q_len);
      e.failure()) return e;
  if (auto e = check_optional(kv_lengths, {B}, "kv_lengths", &has_kv_len);
      e.failure()) return e;
  if (has_q_seg != has_kv_seg) {
    return ffi::Error::InvalidArgument(
        "jax_flash_fwd: q_segment_ids and kv_segment_ids come together");
  }
  if (B == 0 || Sq == 0 || H == 0) return ffi::Error::Success();

  FwdParams p;
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
  p.head_dim_v = static_cast<int>(Dv);
  p.softmax_scale = softmax_scale;
  p.softmax_scale_log2 = softmax_scale * static_cast<float>(M_LOG2E);
  p.window_left = window_left < 0 ? -1 : window_left;
  p.window_right = window_right < 0 ? -1 : window_right;
  p.softcap = softcap > 0.f ? softcap : 0.f;
  p.alibi_slopes = has_alibi ? alibi_slopes.typed_data() : nullptr;
  p.q_segment_ids = has_q_seg ? q_segment_ids.typed_data() : nullptr;
  p.kv_segment_ids = has_kv_seg ? kv_segment_ids.typed_data() : nullptr;
  p.q_lengths = has_q_len ? q_lengths.typed_data() : nullptr;
  p.kv_lengths = has_kv_len ? kv_lengths.typed_data() : nullptr;
  p.is_bf16 = dtype == kDtype_bf16;
  const DeviceInfo info = device_info();
  p.arch = info.arch;
  p.num_sms = info.num_sms;

  const char* kernel = nullptr;
#define JAX_FLASH_DISPATCH_FWD(T, tag, head_dim)             \
  if (kernel == nullptr && dtype == kDtype_##tag && D == head_dim) { \
    run_mha_fwd_<T, head_dim>(p, stream);                    \
    kernel = "flash_fwd<" #tag ", " #head_dim ">";           \
  }
  JAX_FLASH_FWD_KERNELS(JAX_FLASH_DISPATCH_FWD)
#undef JAX_FLASH_DISPATCH_FWD
  if (kernel == nullptr) {
    return ffi::Error::InvalidArgument(
        "jax_flash_fwd: no kernel built for this dtype and head dim " +
        std::to_string(D) + " (see jax_flash_build_info)");
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    return ffi::Error::Internal(std::string("jax_flash_fwd: ") + kernel +
                                " failed: " + cudaGetErrorString(err));
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
        .Ret<ffi::AnyBuffer>()             // out (B, Sq, H, Dv)
        .Ret<ffi::Buffer<ffi::F32>>()      // lse (B, H, Sq), natural log
        .Attr<float>("softmax_scale")      // multiplies q.k first
        .Attr<int32_t>("window_left")      // -1 = unbounded
        .Attr<int32_t>("window_right")     // -1 = unbounded; causal = 0
        .Attr<float>("softcap"),           // 0 = off
    {ffi::Traits::kCmdBufferCompatible});
