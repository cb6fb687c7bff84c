// Helpers shared by the FFI handlers (ffi_fwd.cu, ffi_bwd.cu): shape checks
// with errors that name the operand, optional operands, and the device
// properties the launch templates choose kernels by.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <string>

#include "common/flash.h"
#include "xla/ffi/api/ffi.h"

namespace jax_flash {

namespace ffi = xla::ffi;

// "(2, 128, 8, 64)"; a 1-d shape as "(0,)".
inline std::string shape_text(ffi::AnyBuffer::Dimensions dims) {
  std::string text = "(";
  for (size_t i = 0; i < dims.size(); ++i) {
    text += (i ? ", " : "") + std::to_string(dims[i]);
  }
  return text + (dims.size() == 1 ? ",)" : ")");
}

// An error naming `target` and `name` unless `dims` is exactly `want`.
inline ffi::Error expect_shape(const char* target, const char* name,
                               ffi::AnyBuffer::Dimensions dims,
                               std::initializer_list<int64_t> want) {
  bool same = dims.size() == want.size();
  for (size_t i = 0; same && i < dims.size(); ++i) {
    same = dims[i] == want.begin()[i];
  }
  if (same) return ffi::Error::Success();
  std::string wanted = "(";
  for (int64_t d : want) wanted += std::to_string(d) + ", ";
  wanted = wanted.substr(0, wanted.size() - 2) + ")";
  return ffi::Error::InvalidArgument(std::string(target) + ": " + name +
                                     " has shape " + shape_text(dims) +
                                     ", expected " + wanted);
}

// An optional operand is either empty, shape (0,), or exactly `want`.
// Sets *data to its data, or nullptr when empty.
template <typename Buffer>
ffi::Error optional_operand(const char* target, const char* name,
                            const Buffer& buffer,
                            std::initializer_list<int64_t> want,
                            const void** data) {
  *data = nullptr;
  if (buffer.element_count() == 0) return ffi::Error::Success();
  ffi::Error e = expect_shape(target, name, buffer.dimensions(), want);
  if (e.failure()) return e;
  *data = buffer.untyped_data();
  return ffi::Error::Success();
}

// Reads the optional mask operands of both handlers into p: alibi slopes
// (B, H), segment ids (B, Sq) and (B, Sk), which come together, q/kv
// lengths (B,) and position offsets (B,); an empty buffer means absent.
// Errors name `target` and the operand.
inline ffi::Error read_mask_operands(
    const char* target, int64_t B, int64_t H, int64_t Sq, int64_t Sk,
    const ffi::Buffer<ffi::F32>& alibi_slopes,
    const ffi::Buffer<ffi::S32>& q_segment_ids,
    const ffi::Buffer<ffi::S32>& kv_segment_ids,
    const ffi::Buffer<ffi::S32>& q_lengths,
    const ffi::Buffer<ffi::S32>& kv_lengths,
    const ffi::Buffer<ffi::S32>& position_offsets, FwdParams* p) {
  const void* data[6] = {};
  ffi::Error e =
      optional_operand(target, "alibi_slopes", alibi_slopes, {B, H}, &data[0]);
  if (e.success()) {
    e = optional_operand(target, "q_segment_ids", q_segment_ids, {B, Sq},
                         &data[1]);
  }
  if (e.success()) {
    e = optional_operand(target, "kv_segment_ids", kv_segment_ids, {B, Sk},
                         &data[2]);
  }
  if (e.success()) {
    e = optional_operand(target, "q_lengths", q_lengths, {B}, &data[3]);
  }
  if (e.success()) {
    e = optional_operand(target, "kv_lengths", kv_lengths, {B}, &data[4]);
  }
  if (e.success()) {
    e = optional_operand(target, "position_offsets", position_offsets, {B},
                         &data[5]);
  }
  if (e.failure()) return e;
  if ((data[1] == nullptr) != (data[2] == nullptr)) {
    return ffi::Error::InvalidArgument(
        std::string(target) +
        ": q_segment_ids and kv_segment_ids come together");
  }
  p->alibi_slopes = static_cast<const float*>(data[0]);
  p->q_segment_ids = static_cast<const int32_t*>(data[1]);
  p->kv_segment_ids = static_cast<const int32_t*>(data[2]);
  p->q_lengths = static_cast<const int32_t*>(data[3]);
  p->kv_lengths = static_cast<const int32_t*>(data[4]);
  p->position_offsets = static_cast<const int32_t*>(data[5]);
  return ffi::Error::Success();
}

// Environment variable that lowers the shared memory per block the kernels
// assume (bytes): the tests use it to run the leaner A100 variants on a
// GPU with more.
constexpr const char* kMaxSmemEnvVar = "JAX_FLASH_MAX_SMEM_PER_BLOCK";

// Fills p.arch, p.num_sms and p.max_smem_per_block from the current device
// (read once per device; the environment override at every call).
inline void set_device_info(FwdParams* p) {
  struct Info {
    int arch = 0, num_sms = 0, max_smem = 0;
  };
  constexpr int kMaxDevices = 64;
  static Info cache[kMaxDevices];
  int device = 0;
  cudaGetDevice(&device);
  Info fresh;
  Info& info = device >= 0 && device < kMaxDevices ? cache[device] : fresh;
  if (info.arch == 0) {
    int major = 0, minor = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
    cudaDeviceGetAttribute(&info.num_sms, cudaDevAttrMultiProcessorCount,
                           device);
    cudaDeviceGetAttribute(&info.max_smem,
                           cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    info.arch = 10 * major + minor;
  }
  p->arch = info.arch;
  p->num_sms = info.num_sms;
  p->max_smem_per_block = info.max_smem;
  if (const char* limit = std::getenv(kMaxSmemEnvVar)) {
    const long value = std::strtol(limit, nullptr, 10);
    if (value > 0 && value < p->max_smem_per_block) {
      p->max_smem_per_block = static_cast<int>(value);
    }
  }
}

// An error unless kernels written for `kernel_arch` (the attribute the
// lowering chose) run on this device: sm90 kernels use sm_90a instructions,
// which only GPUs of compute capability 9.x have. Call after
// set_device_info.
inline ffi::Error check_kernel_arch(const char* target, int32_t kernel_arch,
                                    const FwdParams& p) {
  if (kernel_arch != 90 || p.arch / 10 == 9) return ffi::Error::Success();
  return ffi::Error::InvalidArgument(
      std::string(target) + ": the sm90 kernels need a GPU of compute "
      "capability 9.x, this one is sm_" + std::to_string(p.arch));
}

// The error for a failed launch, naming the kernel.
inline ffi::Error launch_error(const std::string& what, cudaError_t status) {
  return ffi::Error::Internal(what + " failed: " +
                              cudaGetErrorString(status));
}

// The error for a kernel that needs more shared memory than the GPU offers.
inline ffi::Error shared_memory_error(const std::string& what, int needed,
                                      const FwdParams& p) {
  return ffi::Error(
      ffi::ErrorCode::kResourceExhausted,
      what + " needs " + std::to_string(needed) +
          " bytes of shared memory per block; this GPU offers " +
          std::to_string(p.max_smem_per_block) + " (sm_" +
          std::to_string(p.arch) + ")");
}

}  // namespace jax_flash
