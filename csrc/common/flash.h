// Parameters of the attention kernels, shared by every direction and every
// architecture's kernel: the FFI handlers fill these structs once, and the
// launch templates (sm80 mma.sync today, an sm90 wgmma kernel later) pick the
// kernel from `arch` and the tensor shapes alone.
//
// Letters: B batch, Sq/Sk query/key length, H query heads, Hkv key/value heads
// (H % Hkv == 0), D head dim of q/k, Dv head dim of v. Strides are in
// elements; tensors are (B, S, heads, D) as in docs/ffi_contract.md.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace jax_flash {

// log2(e): the kernels compute exp(x) as exp2(x * kLog2e).
constexpr float kLog2e = 1.4426950408889634f;

// Dynamic shared memory one CTA may opt into, by device. sm_80 (A100):
// 163 KB; kernels whose fast configuration needs more also get a leaner
// variant (fewer buffers), picked at run time from the device's own limit.
// sm_90 (H100, H200): 227 KB. (sm_86 / sm_89 offer 99 KB: the larger head
// dims do not fit there.)
constexpr int kSm80SmemPerBlock = 163 * 1024;
constexpr int kSm90SmemPerBlock = 227 * 1024;
// The forward's workspace operand: the sm90 kernel's tile counter.
constexpr int64_t kFwdWorkspaceBytes = 16;

// Inputs and outputs of the forward pass, and everything a mask needs.
struct FwdParams {
  // q (B, Sq, H, D), k (B, Sk, Hkv, D), v (B, Sk, Hkv, Dv): dtype T.
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  // out (B, Sq, H, Dv): dtype T.
  void* out = nullptr;
  // lse (B, H, Sq): float32, natural log, -inf for a row that sees no key.
  float* lse = nullptr;

  int64_t q_batch_stride = 0, q_row_stride = 0, q_head_stride = 0;
  int64_t k_batch_stride = 0, k_row_stride = 0, k_head_stride = 0;
  int64_t v_batch_stride = 0, v_row_stride = 0, v_head_stride = 0;
  int64_t out_batch_stride = 0, out_row_stride = 0, out_head_stride = 0;
  // lse is dense (B, H, Sq): its strides follow from H and Sq.

  int batch = 0;      // B
  int seqlen_q = 0;   // Sq
  int seqlen_k = 0;   // Sk
  int num_heads = 0;  // H
  int num_heads_kv = 0;  // Hkv
  int head_dim = 0;   // D (== Dv)

  // logits = q.k * softmax_scale before softcap and alibi.
  float softmax_scale = 1.f;
  // softmax_scale * log2(e): the kernels work with exp2.
  float softmax_scale_log2 = 1.f;
  // Window around the aligned diagonal, causal folded in; -1 = unbounded.
  int window_left = -1;
  int window_right = -1;
  // softcap * tanh(logits / softcap) when > 0.
  float softcap = 0.f;

  // Optional operands: nullptr when absent.
  const float* alibi_slopes = nullptr;   // (B, H)
  const int32_t* q_segment_ids = nullptr;   // (B, Sq)
  const int32_t* kv_segment_ids = nullptr;  // (B, Sk)
  const int32_t* q_lengths = nullptr;    // (B,)
  const int32_t* kv_lengths = nullptr;   // (B,)
  // (B,): q_offset - kv_offset, the global positions of the first query and
  // key of this call in a larger problem (a ring step, say); added to each
  // row's diagonal offset kv_len - q_len (common/mask.h).
  const int32_t* position_offsets = nullptr;

  bool is_bf16 = true;  // T is bf16 (else fp16)
  int arch = 80;        // compute capability of the device, e.g. 80, 90
  int num_sms = 0;      // multiprocessors on the device
  // sm90 forward: an int in global memory, zero at launch, from which the
  // persistent CTAs claim their tiles (in the call's workspace).
  int* tile_counter = nullptr;
  // Dynamic shared memory a CTA may opt into on the device (bytes); the
  // launch templates pick leaner variants below their fast kernels' needs.
  int max_smem_per_block = kSm90SmemPerBlock;
};

// The backward pass: the forward's inputs and mask, plus out, dout, lse and
// the gradients. dq, dk, dv have the shapes and strides of q, k, v.
struct BwdParams : FwdParams {
  // out and dout (B, Sq, H, Dv): dtype T; `FwdParams::out` is read-only here.
  const void* dout = nullptr;
  int64_t dout_batch_stride = 0, dout_row_stride = 0, dout_head_stride = 0;

  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  int64_t dq_batch_stride = 0, dq_row_stride = 0, dq_head_stride = 0;
  int64_t dk_batch_stride = 0, dk_row_stride = 0, dk_head_stride = 0;
  int64_t dv_batch_stride = 0, dv_row_stride = 0, dv_head_stride = 0;

  // dlse (B, H, Sq) float32: the cotangent of lse, nullptr when it is zero.
  // It enters as dS = P * (dP - (delta - dlse)).
  const float* dlse = nullptr;
  // dalibi (B, H) float32, nullptr when no slopes were given.
  float* dalibi = nullptr;
  // Scratch of jax_flash_bwd_workspace_bytes(...) bytes.
  void* workspace = nullptr;
  int64_t workspace_bytes = 0;
  // Bitwise reproducible gradients: no order-dependent float atomics.
  bool deterministic = false;
};

// One specialization per (kArch, T, kHeadDim) is compiled from the files
// build/generate_kernels.py writes, each calling its arch's launch template
// (csrc/sm80/, csrc/sm90/); build/generated/kernel_list.h declares them.
// kArch is the architecture the kernel is written for (80: mma.sync, runs on
// every GPU from sm_80 on; 90: sm_90a only), T is __nv_bfloat16 or __half;
// kHeadDim = D = Dv. They return 0 once the kernels are launched, or,
// launching nothing, the bytes of shared memory per block the smallest
// variant needs when the device offers less.
template <int kArch, typename T, int kHeadDim>
int run_mha_fwd_(const FwdParams& params, cudaStream_t stream);

template <int kArch, typename T, int kHeadDim>
int run_mha_bwd_(const BwdParams& params, cudaStream_t stream);

}  // namespace jax_flash
