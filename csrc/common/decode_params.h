// Parameters of the split-KV decoding kernels: a few query rows against a
// long key/value cache, contiguous or paged.
//
// Letters: B batch, Sq new query tokens (1..16 typically), H query heads,
// Hkv key/value heads (G = H / Hkv query heads share one), D head dim (q, k
// and v alike). Strides are in elements.
//
// Cache layouts:
//   contiguous: k, v (B, S_max, Hkv, D); row b's key j is at
//               b * batch_stride + j * row_stride + h * head_stride.
//   paged:      k, v (num_blocks, block_size, Hkv, D) and block_table
//               (B, max_blocks) int32; row b's key j is in physical block
//               block_table[b, j / block_size], slot j % block_size. A block
//               id outside [0, num_blocks) reads nothing: its keys are masked.
// seq_lengths[b] keys are valid (clamped to [0, capacity]); the Sq queries
// are the last Sq positions of the row, so query s sits at position
// seq_lengths[b] - Sq + s and masks align bottom-right per row, as in
// docs/ffi_contract.md.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/kv_cache_tensor_map.h"

namespace jax_flash {

struct DecodeParams {
  const void* q = nullptr;  // (B, Sq, H, D), dtype T
  const void* k = nullptr;  // cache of keys, dtype T (layout above)
  const void* v = nullptr;  // cache of values, dtype T
  void* out = nullptr;      // (B, Sq, H, D), dtype T
  float* lse = nullptr;     // (B, H, Sq) float32, natural log

  int64_t q_batch_stride = 0, q_row_stride = 0, q_head_stride = 0;
  int64_t out_batch_stride = 0, out_row_stride = 0, out_head_stride = 0;
  // Contiguous: batch stride of the cache; paged: stride of one block.
  int64_t kv_batch_stride = 0;
  int64_t kv_row_stride = 0, kv_head_stride = 0;  // same for k and v

  const int32_t* seq_lengths = nullptr;  // (B,) valid keys per row
  const int32_t* block_table = nullptr;  // (B, max_blocks), paged only
  int block_size = 0;   // paged: keys per block
  int block_size_log2 = -1;  // paged: log2(block_size) if a power of 2
  int max_blocks = 0;   // paged: entries per block-table row
  int num_blocks = 0;   // paged: blocks in the cache
  int capacity = 0;     // keys a row can hold: S_max or max_blocks*block_size

  int batch = 0;         // B
  int seqlen_q = 0;      // Sq
  int num_heads = 0;     // H
  int num_heads_kv = 0;  // Hkv
  int head_dim = 0;      // D

  float softmax_scale = 1.f;
  float softcap = 0.f;     // softcap * tanh(logit / softcap) when > 0
  int window_left = -1;    // -1 = unbounded
  int window_right = -1;   // -1 = unbounded; causal folds in as 0
  const float* alibi_slopes = nullptr;  // (B, H) or nullptr

  // Split-KV: each (row tile, B, Hkv) is cut into num_splits key ranges
  // whose float32 partial results a combine kernel merges. With one split
  // the main kernel writes out and lse itself.
  int num_splits = 1;
  float* partial_out = nullptr;  // (num_splits, B, H, Sq, D) float32
  float* partial_lse = nullptr;  // (num_splits, B, H, Sq) float32

  // Tensor maps of the cache (sm_90): set, with use_tensor_maps, by
  // make_kv_cache_tensor_maps (ffi/decode_tensor_maps.h) where the cache
  // meets the copy engine's rules; the kernel then loads K/V by TMA.
  bool use_tensor_maps = false;
  KvCacheTensorMaps maps;

  int arch = 0;     // compute capability, 10 * major + minor
  int num_sms = 0;  // multiprocessors on the device
  // Dynamic shared memory a CTA may opt into on the device (bytes).
  int max_smem_per_block = 0;
};

// One instantiation per (arch, T, kHeadDim), from the files
// build/generate_kernels.py writes (kernel_list.h declares them): launches
// the decode (and, with several splits, combine) kernels; returns 0, or the
// bytes of shared memory per block needed when the device offers less
// (launching nothing).
template <int kArch, typename T, int kHeadDim>
int run_mha_decode_(const DecodeParams& params, cudaStream_t stream);

}  // namespace jax_flash
