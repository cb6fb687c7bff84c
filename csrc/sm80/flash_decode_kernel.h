// Split-KV decoding kernel (sm80 instructions, bandwidth-bound) and the
// combine kernel that merges its partial results.
//
// Decoding multiplies a handful of query rows with a long K/V cache, so time
// is the time to read K and V once. One CTA per (split, row tile, batch row,
// K/V head): the G = H / Hkv query heads of the K/V head and the Sq new
// tokens are packed into rows r = g * Sq + s, so every query head sharing a
// K/V head reads it once. The CTA streams its split's key range through a
// cp.async pipeline (decode_stages() stages of 64 keys); its four warps
// either take a quarter (or half) of every key tile each, for few rows, or
// an m16 block of rows each, for many. Each warp keeps an online softmax:
//   S = Q K^T (mma.sync m16n8k16), logits with softcap/alibi, the masks,
//   P = exp(S - max), O += P V.
// On sm_90 the K/V tiles come in through the copy engine instead
// (DecodeLoads), into a 128-byte-swizzled layout: for a contiguous cache one
// tensor copy (TMA) per K tile and per V tile, issued by one thread; for a
// paged cache one per block of the tile (and per 64 columns when a block
// holds fewer than 64 keys), issued by a lane per block. Each stage
// completes on an mbarrier that counts its bytes. Paged caches whose block
// size is not a power of two take one `cp.async.bulk` per K row and per V
// row instead.
// The warps' (out, lse) are merged through shared memory; with one split
// that is the result, otherwise a float32 partial per split that
// flash_decode_combine_kernel merges (the same math as
// jax_flash.merge_attention_states).
#pragma once

#include <cmath>
#include <cstdint>

#include <cute/arch/copy_sm90_desc.hpp>
#include <cute/arch/copy_sm90_tma.hpp>
#include <cutlass/arch/barrier.h>

#include "common/bulk_copy.h"
#include "common/decode_params.h"
#include "common/kv_cache_tensor_map.h"
#include "common/mask.h"
#include "common/utils.h"
#include "sm80/decode_tile_size.h"
#include "sm80/softmax.h"
#include "sm80/tile_size.h"
#include "sm80/warp_mma.h"

namespace jax_flash {

template <typename T_, int kHeadDim_, int kKeyWarps_>
struct DecodeTraits {
  using T = T_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kNWarps = kDecodeWarps;
  static constexpr int kNThreads = kNWarps * 32;
  static constexpr int kKeyWarps = kKeyWarps_;          // warps per key tile
  static constexpr int kRowWarps = kNWarps / kKeyWarps;  // m16 row blocks
  static constexpr int kRows = 16 * kRowWarps;           // query rows per CTA
  static constexpr int kBlockN = kDecodeBlockN;
  static constexpr int kWarpKeys = kBlockN / kKeyWarps;  // keys a warp takes
  static constexpr int kNTiles = kWarpKeys / 8;          // n8 tiles of S
  static constexpr int kDTiles = kHeadDim / 8;           // n8 tiles of O
  static constexpr int kStages = decode_stages(kHeadDim);
  static constexpr int kPitch = smem_row_pitch(kHeadDim);  // elements
  static constexpr int kChunksPerRow = kHeadDim / 8;       // 16-byte chunks
  // Shared memory: kStages K tiles and kStages V tiles (first, so that
  // each starts 1024-byte aligned as the swizzled layout needs), Q, one
  // flag per key of each stage (the key is readable: inside the split's
  // range and in a valid block), one mbarrier per stage. A tile takes
  // kBlockN padded rows (cp.async, bulk rows) or kBlockN dense swizzled
  // rows (tensor copies), within the same bytes. The epilogue reuses the
  // K/V tiles for the warps' float32 outputs and lse.
  static constexpr int kTileBytes =
      kBlockN * kPitch * static_cast<int>(sizeof(T));
  // Bytes a tensor copy of one tile brings (the box: kBlockN x kHeadDim).
  static constexpr int kDenseTileBytes =
      kBlockN * kHeadDim * static_cast<int>(sizeof(T));
  static constexpr int kKVBytes = 2 * kStages * kTileBytes;
  static constexpr int kQOffset = kKVBytes;
  static constexpr int kQBytes = kRows * kPitch * static_cast<int>(sizeof(T));
  static constexpr int kFlagOffset = kQOffset + kQBytes;
  static constexpr int kFlagBytes = kStages * kBlockN * 4;
  static constexpr int kBarrierOffset = kFlagOffset + kFlagBytes;
  static constexpr int kBarrierBytes = kStages * 8;
  static constexpr int kSmemBytes = kBarrierOffset + kBarrierBytes;
  // Bytes of one cache row (one key of one K/V head), the unit of a bulk
  // copy.
  static constexpr int kRowBytes = kHeadDim * static_cast<int>(sizeof(T));
  // Epilogue: a (16 x (kHeadDim + 1)) float tile and 16 lse per warp.
  static constexpr int kScratchBytes = kNWarps * 16 * (kHeadDim + 2) * 4;

  static_assert(kNWarps % kKeyWarps == 0, "warps split rows x keys");
  static_assert(kNTiles % 2 == 0, "K fragments load two n8 tiles at once");
  static_assert(kHeadDim % 16 == 0, "head dim in k16 steps");
  static_assert(kScratchBytes <= kKVBytes, "epilogue fits in the K/V tiles");
  static_assert(kTileBytes % 1024 == 0, "tiles stay 1024-byte aligned");
  static_assert(kDenseTileBytes <= kTileBytes, "a swizzled tile fits");
  static_assert(kBarrierOffset % 8 == 0, "mbarriers are 8-byte aligned");
  static_assert(kHeadDim % 64 == 0 && kBlockN == kDecodeTensorBoxRows,
                "tensor copies move 64-column blocks of kBlockN rows");
  static_assert(kBlockN == 16 * kNWarps, "each warp copies 16 rows");
  static_assert(kRowBytes % 16 == 0 && (kPitch * sizeof(T)) % 16 == 0,
                "bulk copies move 16-byte multiples between aligned rows");
  static_assert((kBlockN * kChunksPerRow) % kNThreads == 0 &&
                (kRows * kChunksPerRow) % kNThreads == 0,
                "tile loads split evenly over the threads");
};

// Where row b's key `key` of K/V head `kv_h` lies in the cache (elements
// from the cache's start), and whether it may be read: false for a block id
// outside [0, num_blocks) in a paged cache.
__device__ __forceinline__ int64_t cache_offset(const DecodeParams& p, int b,
                                                int kv_h, int key, bool* ok) {
  int64_t slot = key;
  int64_t base = static_cast<int64_t>(b) * p.kv_batch_stride;
  if (p.block_table != nullptr) {
    // A shift and a mask where the block size is a power of two: an integer
    // division per 16-byte chunk is most of this function's cost otherwise.
    const bool pow2 = p.block_size_log2 >= 0;
    const int index = pow2 ? key >> p.block_size_log2 : key / p.block_size;
    const int block = __ldg(p.block_table +
                            static_cast<int64_t>(b) * p.max_blocks + index);
    *ok = block >= 0 && block < p.num_blocks;
    base = *ok ? static_cast<int64_t>(block) * p.kv_batch_stride : 0;
    slot = pow2 ? key & (p.block_size - 1) : key % p.block_size;
  }
  return base + slot * p.kv_row_stride + kv_h * p.kv_head_stride;
}

// Writes one row's merged result: out (T) and lse, or the split's float32
// partial. `o` holds 4 consecutive output columns starting at d0.
template <typename T>
__device__ __forceinline__ void store_row(const DecodeParams& p, int split,
                                          int b, int h, int s, int d0,
                                          const float (&o)[4], float lse) {
  if (p.num_splits == 1) {
    T* out = static_cast<T*>(p.out) + b * p.out_batch_stride +
             s * p.out_row_stride + h * p.out_head_stride + d0;
    *reinterpret_cast<uint2*>(out) =
        make_uint2(pack2<T>(o[0], o[1]), pack2<T>(o[2], o[3]));
    if (d0 == 0) {
      p.lse[(static_cast<int64_t>(b) * p.num_heads + h) * p.seqlen_q + s] =
          lse;
    }
    return;
  }
  const int64_t row =
      ((static_cast<int64_t>(split) * p.batch + b) * p.num_heads + h) *
          p.seqlen_q + s;
  *reinterpret_cast<float4*>(p.partial_out + row * p.head_dim + d0) =
      make_float4(o[0], o[1], o[2], o[3]);
  if (d0 == 0) p.partial_lse[row] = lse;
}

// How a decoding CTA brings its K/V tiles into shared memory. On sm_90 the
// launcher asks for the tensor copies where the handler could encode the
// cache's tensor maps (DecodeParams::use_tensor_maps), else for kBulkRows
// (paged) or kCpAsync; device code compiled for an earlier arch runs
// kCpAsync whatever it was asked (the copy engine is sm_90's).
enum class DecodeLoads {
  kCpAsync,       // 16-byte cp.async by every thread, padded rows
  kBulkRows,      // one cp.async.bulk per key row (a lane each), padded rows
  kTensorTiles,   // contiguous: one tensor copy per K and per V tile
  kTensorBlocks,  // paged: tensor copies per block of the tile
};

// Lets the next kernel on the stream, launched as a programmatic dependent
// (the combine), start its CTAs; it still waits for this grid to finish.
__device__ __forceinline__ void allow_dependent_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Waits until the grids this one depends on have finished and their
// memory is visible (a no-op without a programmatic dependency).
__device__ __forceinline__ void wait_for_prior_grids() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

template <typename Traits, DecodeLoads kLoadsAsked>
__global__ void __launch_bounds__(Traits::kNThreads)
flash_decode_kernel(const __grid_constant__ DecodeParams p) {
  using T = typename Traits::T;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kStages = Traits::kStages;
  constexpr int kNTiles = Traits::kNTiles;
  constexpr int kDTiles = Traits::kDTiles;
  constexpr int kPitch = Traits::kPitch;
  constexpr int kChunksPerRow = Traits::kChunksPerRow;
  constexpr int kNThreads = Traits::kNThreads;

  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const uint32_t k_base = smem_addr(smem_raw);
  const uint32_t v_base = k_base + kStages * Traits::kTileBytes;
  const uint32_t q_base = k_base + Traits::kQOffset;
  int* key_ok = reinterpret_cast<int*>(smem_raw + Traits::kFlagOffset);
  // sm_90: stage s holds its tile once full[s] completes a phase.
  uint64_t* full =
      reinterpret_cast<uint64_t*>(smem_raw + Traits::kBarrierOffset);
  using StageBarrier = cutlass::arch::ClusterTransactionBarrier;
  constexpr DecodeLoads kLoads =
      kHasBulkCopy ? kLoadsAsked : DecodeLoads::kCpAsync;
  constexpr bool kBulk = kLoads == DecodeLoads::kBulkRows;
  constexpr bool kPagedTensor = kLoads == DecodeLoads::kTensorBlocks;
  constexpr bool kTensor =
      kLoads == DecodeLoads::kTensorTiles || kPagedTensor;
  // Each stage's mbarrier: completed by the bulk copies of its rows (one
  // arrival per warp) or by its tensor copies (one arrival per issuing
  // thread: thread 0, or with a paged cache the lane of each block).
  constexpr bool kBarriers = kBulk || kTensor;
  // The combine kernel may start launching now; it waits for this grid.
  allow_dependent_launch();

  const int split = blockIdx.x;
  const int row0 = blockIdx.y * Traits::kRows;  // first packed row g*Sq+s
  const int b = blockIdx.z / p.num_heads_kv;
  const int kv_h = blockIdx.z % p.num_heads_kv;
  const int groups = p.num_heads / p.num_heads_kv;
  const int total_rows = groups * p.seqlen_q;
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int g = lane / 4;  // accumulator row within the m16 block (and +8)
  const int t = lane % 4;  // accumulator column pair within an n8 tile
  const int row_warp = warp / Traits::kKeyWarps;
  const int key_warp = warp % Traits::kKeyWarps;

  // The Sq queries are the last Sq positions of the row's len keys.
  const int len = min(max(p.seq_lengths[b], 0), p.capacity);
  const AttentionMask mask{p.seqlen_q, len, len - p.seqlen_q, p.window_left,
                           p.window_right, nullptr, nullptr};
  // Keys some query sees, then this split's share of them (whole tiles).
  // The first is rounded down to a tile (its keys before the window are
  // masked), so that tiles start on block boundaries of a paged cache and
  // every load mode splits the keys alike.
  const int visible_lo = mask.key_begin(0) / kBlockN * kBlockN;
  const int visible_hi = mask.key_end(p.seqlen_q);
  const int span = max(visible_hi - visible_lo, 0);
  const int per_split =
      ceil_div(ceil_div(span, p.num_splits), kBlockN) * kBlockN;
  const int key_lo = visible_lo + split * per_split;
  const int key_hi = min(visible_hi, key_lo + per_split);
  const int num_tiles = key_hi > key_lo ? ceil_div(key_hi - key_lo, kBlockN)
                                        : 0;

  // Packed row r of this CTA: query head and token, or past the rows.
  auto head_of = [&](int r) { return kv_h * groups + r / p.seqlen_q; };
  auto token_of = [&](int r) { return r % p.seqlen_q; };

  if (num_tiles == 0) {
    // Nothing visible in this split: out 0 and lse -inf for every row.
    const float zero[4] = {0.f, 0.f, 0.f, 0.f};
    for (int c = tid; c < Traits::kRows * (kHeadDim / 4); c += kNThreads) {
      const int r = row0 + c / (kHeadDim / 4);
      if (r < total_rows) {
        store_row<T>(p, split, b, head_of(r), token_of(r),
                     (c % (kHeadDim / 4)) * 4, zero, -INFINITY);
      }
    }
    return;
  }

  // Q tile: rows past the packed rows are zero.
  {
    const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride;
#pragma unroll
    for (int it = 0; it < Traits::kRows * kChunksPerRow / kNThreads; ++it) {
      const int c = tid + it * kNThreads;
      const int row = c / kChunksPerRow;
      const int col = (c % kChunksPerRow) * 8;
      const int r = row0 + row;
      const bool ok = r < total_rows;
      const T* src = ok ? q + token_of(r) * p.q_row_stride +
                              head_of(r) * p.q_head_stride + col
                        : q;
      cp_async_16(q_base + (row * kPitch + col) * sizeof(T), src, ok);
    }
  }

  const T* k_cache = static_cast<const T*>(p.k);
  const T* v_cache = static_cast<const T*>(p.v);
  // Keys [key_lo + n * kBlockN, +kBlockN) into stage `stage`; keys past the
  // split or in an invalid block are zero-filled and flagged unreadable.
  auto load_kv = [&](int n, int stage) {
    const int n0 = key_lo + n * kBlockN;
#pragma unroll
    for (int it = 0; it < kBlockN * kChunksPerRow / kNThreads; ++it) {
      const int c = tid + it * kNThreads;
      const int row = c / kChunksPerRow;
      const int col = (c % kChunksPerRow) * 8;
      const int key = n0 + row;
      bool ok = key < key_hi;
      const int64_t offset = ok ? cache_offset(p, b, kv_h, key, &ok) : 0;
      const uint32_t dst =
          stage * Traits::kTileBytes + (row * kPitch + col) * sizeof(T);
      cp_async_16(k_base + dst, k_cache + (ok ? offset + col : 0), ok);
      cp_async_16(v_base + dst, v_cache + (ok ? offset + col : 0), ok);
      if (col == 0) key_ok[stage * kBlockN + row] = ok;
    }
  };

  // The same, by bulk copies (sm_90), one row per lane: warp w takes rows
  // [16 w, 16 w + 16) of the tile, lanes 0-15 their K rows and lanes 16-31
  // their V rows, and its lane 0 announces the warp's bytes on full[stage]
  // (four arrivals complete a phase). A row that may not be read is not
  // copied: its V row is zeroed instead (P is 0 there, and 0 * a stale NaN
  // would not be), its K row is left as is (its logits are masked).
  auto load_kv_bulk = [&](int n, int stage) {
    const int row = warp * 16 + lane % 16;
    const bool is_v = lane >= 16;
    const int key = key_lo + n * kBlockN + row;
    bool ok = key < key_hi;
    const int64_t offset = ok ? cache_offset(p, b, kv_h, key, &ok) : 0;
    if (!is_v) key_ok[stage * kBlockN + row] = ok;
    const int copies = __popc(__ballot_sync(0xffffffffu, ok));
    if (lane == 0) {
      StageBarrier::arrive_and_expect_tx(
          &full[stage], static_cast<uint32_t>(copies) * Traits::kRowBytes);
    }
    __syncwarp();
    unsigned char* dst = smem_raw +
                         (is_v ? kStages * Traits::kTileBytes : 0) +
                         stage * Traits::kTileBytes +
                         row * kPitch * static_cast<int>(sizeof(T));
    if (ok) {
      cute::SM90_BULK_COPY_G2S::copy((is_v ? v_cache : k_cache) + offset,
                                     &full[stage], dst, Traits::kRowBytes);
    } else if (is_v) {
      uint4* v_row = reinterpret_cast<uint4*>(dst);
#pragma unroll
      for (int c = 0; c < kChunksPerRow; ++c) {
        v_row[c] = make_uint4(0, 0, 0, 0);
      }
      // Ordered before the bulk copy that next fills this stage.
      fence_shared_for_bulk_copy();
    }
  };

  // The same by tensor copies into the swizzled layout, from thread 0 for
  // a contiguous cache (copies = 1: the whole tile, every column) and from
  // lane c of warp 0 for a paged one: keys [n0 + c * copy_rows, +
  // copy_rows) of tile n, which lie in one block (tiles start on a multiple
  // of kBlockN, block sizes are powers of two), flagged in key_ok[stage *
  // kBlockN + c] as readable or not. `outer` is the cache's outermost
  // coordinate, the batch row or the block id (-1: nothing may be read);
  // with a paged cache block_for fetches it one tile ahead, so that the
  // table's latency stays off the issuing warp's path. Blocks of fewer than
  // kBlockN keys come in 64 columns at a time (the tensor map's box is
  // copy_rows x 64 then), so that each lands in the tile's column blocks.
  // Keys past a contiguous cache's capacity come in as zeros; keys in
  // [key_hi, capacity) come in as stored and are masked (their V rows are
  // zeroed before use, see below). K/V are read once: evict them from L2
  // first.
  const int copy_rows = kPagedTensor ? min(p.block_size, kBlockN) : kBlockN;
  const int copy_log2 = kPagedTensor ? min(p.block_size_log2, 6) : 6;
  const int copies = kBlockN / copy_rows;
  static_assert(kBlockN == 64, "copy_log2 is that of kBlockN at most");
  auto block_for = [&](int n) {
    const int key = key_lo + n * kBlockN + tid * copy_rows;
    if (n >= num_tiles || key >= key_hi) return -1;
    const int block = __ldg(p.block_table +
                            static_cast<int64_t>(b) * p.max_blocks +
                            (key >> p.block_size_log2));
    return block >= 0 && block < p.num_blocks ? block : -1;
  };
  auto load_kv_tensor = [&](int n, int stage, int outer) {
    const int key = key_lo + n * kBlockN + tid * copy_rows;
    const bool ok = outer >= 0;
    if constexpr (kPagedTensor) key_ok[stage * kBlockN + tid] = ok;
    StageBarrier::arrive_and_expect_tx(
        &full[stage],
        ok ? 2u * copy_rows * kHeadDim * static_cast<uint32_t>(sizeof(T))
           : 0u);
    if (!ok) return;
    constexpr uint64_t kEvictFirst =
        static_cast<uint64_t>(cute::TMA::CacheHintSm90::EVICT_FIRST);
    const int row = kPagedTensor ? key & (p.block_size - 1) : key;
    unsigned char* k_dst =
        smem_raw + stage * Traits::kTileBytes + tid * copy_rows * 128;
    const int column_blocks = copy_rows == kBlockN ? 1 : kHeadDim / 64;
    for (int cb = 0; cb < column_blocks; ++cb) {
      unsigned char* dst = k_dst + cb * kBlockN * 128;
      cute::SM90_TMA_LOAD_5D::copy(&p.maps.k, &full[stage], kEvictFirst, dst,
                                   0, row, cb, kv_h, outer);
      cute::SM90_TMA_LOAD_5D::copy(&p.maps.v, &full[stage], kEvictFirst,
                                   dst + kStages * Traits::kTileBytes, 0, row,
                                   cb, kv_h, outer);
    }
  };
  int pending_block = -1;  // paged: this lane's block of the next tile

  if constexpr (kBarriers) {
    if (tid == 0) {
      const int arrivals =
          kPagedTensor ? copies : kTensor ? 1 : Traits::kNWarps;
#pragma unroll
      for (int s = 0; s < kStages; ++s) {
        StageBarrier::init(&full[s], arrivals);
      }
      cutlass::arch::fence_barrier_init();
    }
    __syncthreads();
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
      if (s < num_tiles) {
        if constexpr (kPagedTensor) {
          if (tid < copies) load_kv_tensor(s, s, block_for(s));
        } else if constexpr (kTensor) {
          if (tid == 0) load_kv_tensor(s, s, b);
        } else {
          load_kv_bulk(s, s);
        }
      }
    }
    if constexpr (kPagedTensor) {
      if (tid < copies) pending_block = block_for(kStages - 1);
    }
    cp_async_commit();  // Q
    cp_async_wait<0>();  // the loop's first barrier publishes it
  } else {
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
      if (s < num_tiles) load_kv(s, s);
      cp_async_commit();  // the first group carries Q as well
    }
  }

  // This warp's operands in shared memory: its 16 query rows, and the
  // first of its keys in each K and V tile (the swizzled layout is
  // addressed from the tile's origin, by key row).
  const T* q_warp = reinterpret_cast<const T*>(smem_raw + Traits::kQOffset) +
                    row_warp * 16 * kPitch;
  const int warp_key_row = key_warp * Traits::kWarpKeys;

  // This lane's two rows (g and g + 8 of the warp's m16 block): their query
  // token (Sq for padding rows, which then see no key), head and alibi slope.
  int token[2];
  float slope[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row0 + row_warp * 16 + g + 8 * r;
    const bool live = row < total_rows;
    token[r] = live ? token_of(row) : p.seqlen_q;
    slope[r] = live && p.alibi_slopes != nullptr
        ? p.alibi_slopes[static_cast<int64_t>(b) * p.num_heads + head_of(row)]
        : 0.f;
  }
  const Softcap softcap{p.softcap, p.softcap > 0.f ? 1.f / p.softcap : 0.f};

  float acc[1][kDTiles][4];
  zero(acc);
  OnlineSoftmax<1> softmax;
  softmax.init();

  for (int n = 0; n < num_tiles; ++n) {
    const int stage = n % kStages;
    const int next = n + kStages - 1;
    if constexpr (kBarriers) {
      // Every warp is done with tile n - 1, so its stage takes tile n +
      // kStages - 1 now, before tile n has landed: kStages tiles stay in
      // flight while the warps wait, instead of kStages - 1.
      __syncthreads();
      if (next < num_tiles) {
        if constexpr (kPagedTensor) {
          if (tid < copies) {
            load_kv_tensor(next, next % kStages, pending_block);
            pending_block = block_for(next + 1);
          }
        } else if constexpr (kTensor) {
          if (tid == 0) load_kv_tensor(next, next % kStages, b);
        } else {
          load_kv_bulk(next, next % kStages);
        }
      }
      StageBarrier::wait(&full[stage], (n / kStages) & 1);  // tile n landed
    } else {
      cp_async_wait<kStages - 2>();  // tile n (and Q) have landed
      __syncthreads();               // and every warp is done with tile n - 1
      if (next < num_tiles) load_kv(next, next % kStages);
      cp_async_commit();
    }
    if constexpr (kTensor) {
      // V rows that were not copied, or hold what the cache holds past the
      // split's keys (perhaps not finite, and 0 * inf is NaN), are zeroed
      // before any warp reads them: the rows from key_hi on in the last
      // tile, and with a paged cache the rows of blocks that may not be
      // read (stale or never written shared memory otherwise).
      const int n0 = key_lo + n * kBlockN;
      const int first = min(key_hi - n0, kBlockN);  // rows [first, kBlockN)
      bool skipped = false;
      if constexpr (kPagedTensor) {
        for (int c = 0; c < copies; ++c) {
          skipped |= key_ok[stage * kBlockN + c] == 0;
        }
      }
      if (first < kBlockN || skipped) {
        uint4* v_rows = reinterpret_cast<uint4*>(
            smem_raw + (kStages + stage) * Traits::kTileBytes);
        constexpr int kBlocks = kHeadDim / 64;  // 128-byte rows per key
        for (int c = tid; c < kBlocks * kBlockN * 8; c += kNThreads) {
          const int row = (c / 8) % kBlockN;
          bool clear = row >= first;
          if constexpr (kPagedTensor) {
            clear |= key_ok[stage * kBlockN + (row >> copy_log2)] == 0;
          }
          if (clear) v_rows[c] = make_uint4(0, 0, 0, 0);
        }
        // Ordered before the tensor copy that next fills this stage.
        fence_shared_for_bulk_copy();
        __syncthreads();  // the zeros, before any warp reads tile n
      }
    }
    const T* k_tile =
        reinterpret_cast<const T*>(smem_raw + stage * Traits::kTileBytes);
    const T* v_tile = k_tile + kStages * Traits::kTileBytes / sizeof(T);
    // The warp's keys start at row warp_key_row of the tile, a multiple of
    // 8, so the swizzle (by row % 8) reads the same from there.
    const auto tile = [] {
      if constexpr (kTensor) {
        return Swizzled128Tile<kBlockN>{};
      } else {
        return PitchedTile{kPitch};
      }
    }();
    static_assert(Traits::kWarpKeys % 8 == 0, "warps' keys start at row 8k");
    const T* k_warp = k_tile + tile.offset(warp_key_row, 0);
    const T* v_warp = v_tile + tile.offset(warp_key_row, 0);

    // S = Q K^T over this warp's keys of the tile
    float s[1][kNTiles][4];
    zero(s);
    warp_mma<1, kNTiles, kHeadDim, false, false>(s, q_warp, kPitch, k_warp,
                                                 tile);

    // Logits (scale, softcap, alibi), then the mask: the row's visible key
    // range and the tile's readable keys.
    const int warp_key0 = key_lo + n * kBlockN + key_warp * Traits::kWarpKeys;
    const int* ok_tile = key_ok + stage * kBlockN + key_warp * Traits::kWarpKeys;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const MaskRow row = mask.row(token[r]);
      const int query_pos = token[r] + mask.offset;
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int jj = nt * 8 + 2 * t + e;
          const int j = warp_key0 + jj;
          float x = s[0][nt][2 * r + e] * p.softmax_scale;
          if (softcap.enabled()) x = softcap(x);
          x -= slope[r] * fabsf(static_cast<float>(query_pos - j));
          // Readable: flagged by the loads, or for tensor copies inside the
          // split (and with a paged cache in a block that may be read).
          bool readable;
          if constexpr (kPagedTensor) {
            readable = j < key_hi &&
                       key_ok[stage * kBlockN +
                              ((warp_key_row + jj) >> copy_log2)] != 0;
          } else if constexpr (kTensor) {
            readable = j < key_hi;
          } else {
            readable = ok_tile[jj] != 0;
          }
          const bool visible = row.sees(j) && readable;
          s[0][nt][2 * r + e] = visible ? x : -INFINITY;
        }
      }
    }

    softmax.update(s, acc, kLog2e);

    // O += P V, P from the score registers.
#pragma unroll
    for (int kk = 0; kk < Traits::kWarpKeys / 16; ++kk) {
      uint32_t a[1][4];
      accumulator_as_a<T>(s, kk, a);
      warp_mma_a_in_registers<1, kDTiles, true>(acc, a, v_warp, tile,
                                                kk * 16);
    }
  }

  // Epilogue: each warp's normalized rows and lse into shared memory (over
  // the K/V tiles, now idle), then the warps that shared a key tile merged.
  float inv_sum[1][2];
  float lse[1][2];
  softmax.finalize(inv_sum, lse, kLog2e);
  cp_async_wait<0>();
  __syncthreads();
  constexpr int kScratchPitch = kHeadDim + 1;  // floats; staggers the banks
  float* o_part = reinterpret_cast<float*>(smem_raw);
  float* lse_part = o_part + Traits::kNWarps * 16 * kScratchPitch;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = warp * 16 + g + 8 * r;
    if (t == 0) lse_part[row] = lse[0][r];
#pragma unroll
    for (int dt = 0; dt < kDTiles; ++dt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        o_part[row * kScratchPitch + dt * 8 + 2 * t + e] =
            acc[0][dt][2 * r + e] * inv_sum[0][r];
      }
    }
  }
  __syncthreads();

  for (int c = tid; c < Traits::kRows * (kHeadDim / 4); c += kNThreads) {
    const int row = c / (kHeadDim / 4);  // row of the CTA's tile
    const int d0 = (c % (kHeadDim / 4)) * 4;
    const int r = row0 + row;
    if (r >= total_rows) continue;
    // Scratch row of key warp w for this tile row.
    const int first = (row / 16) * Traits::kKeyWarps * 16 + row % 16;
    float m = -INFINITY;
#pragma unroll
    for (int w = 0; w < Traits::kKeyWarps; ++w) {
      m = fmaxf(m, lse_part[first + 16 * w]);
    }
    float o[4] = {0.f, 0.f, 0.f, 0.f};
    float row_lse = -INFINITY;
    if (m != -INFINITY) {
      float total = 0.f;
#pragma unroll
      for (int w = 0; w < Traits::kKeyWarps; ++w) {
        const float part_lse = lse_part[first + 16 * w];
        if (part_lse == -INFINITY) continue;  // saw nothing: skip its row
        const float weight = expf(part_lse - m);
        total += weight;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          o[e] += weight *
                  o_part[(first + 16 * w) * kScratchPitch + d0 + e];
        }
      }
#pragma unroll
      for (int e = 0; e < 4; ++e) o[e] /= total;
      row_lse = m + logf(total);
    }
    store_row<T>(p, split, b, head_of(r), token_of(r), d0, o, row_lse);
  }
}

// Merges the splits' float32 partials of one (b, h, s) row per warp into
// out (T) and lse: lse = log(sum_i exp(lse_i)), out = sum_i exp(lse_i - lse)
// out_i. The kernel is latency-bound, so each lane issues all its loads in
// one round before it uses any: the lse of splits l and l + 32, and its
// kHeadDim / 32 columns of the first kSplitsAtOnce splits' partial rows
// (any further splits follow kSplitsAtOnce at a time). The weights then
// come from a warp max and sum. A split that saw nothing has lse -inf and
// weight 0 (its out is 0, never NaN: flash_decode_kernel writes zeros
// there). Launched as a programmatic dependent of the split kernel on
// sm_90: its CTAs start while that grid runs and wait for it here.
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(128)
flash_decode_combine_kernel(const __grid_constant__ DecodeParams p) {
  constexpr int kPerLane = kHeadDim / 32;  // output columns of one lane
  constexpr int kVec = kPerLane % 4 == 0 ? 4 : 2;  // floats per load
  constexpr int kSplitsAtOnce = kPerLane <= 4 ? 16 : 8;
  static_assert(kPerLane % kVec == 0, "columns in whole vectors");
  static_assert(kDecodeMaxSplits == 64, "two lse per lane");
  const int64_t rows =
      static_cast<int64_t>(p.batch) * p.num_heads * p.seqlen_q;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 4 + threadIdx.x / 32;
  if (row >= rows) return;
  const int lane = threadIdx.x % 32;
  const int s = static_cast<int>(row % p.seqlen_q);
  const int h = static_cast<int>((row / p.seqlen_q) % p.num_heads);
  const int b = static_cast<int>(row / (static_cast<int64_t>(p.seqlen_q) *
                                        p.num_heads));
  const float* part = p.partial_out + row * kHeadDim + lane * kPerLane;
  const int64_t split_stride = rows * kHeadDim;
  // Loads this lane's columns of splits [first, first + kSplitsAtOnce).
  auto load = [&](int first, float (&x)[kSplitsAtOnce][kPerLane]) {
#pragma unroll
    for (int i = 0; i < kSplitsAtOnce; ++i) {
      const bool live = first + i < p.num_splits;
      const float* src = part + (live ? (first + i) * split_stride : 0);
#pragma unroll
      for (int e = 0; e < kPerLane; e += kVec) {
        if constexpr (kVec == 4) {
          const float4 v = live ? *reinterpret_cast<const float4*>(src + e)
                                : make_float4(0.f, 0.f, 0.f, 0.f);
          x[i][e] = v.x, x[i][e + 1] = v.y, x[i][e + 2] = v.z,
          x[i][e + 3] = v.w;
        } else {
          const float2 v = live ? *reinterpret_cast<const float2*>(src + e)
                                : make_float2(0.f, 0.f);
          x[i][e] = v.x, x[i][e + 1] = v.y;
        }
      }
    }
  };

  wait_for_prior_grids();  // the split kernel's partials
  const float lse_lo =
      lane < p.num_splits ? p.partial_lse[lane * rows + row] : -INFINITY;
  const float lse_hi = lane + 32 < p.num_splits
                           ? p.partial_lse[(lane + 32) * rows + row]
                           : -INFINITY;
  float x[kSplitsAtOnce][kPerLane];
  load(0, x);
  float m = fmaxf(lse_lo, lse_hi);
#pragma unroll
  for (int delta = 16; delta > 0; delta /= 2) {
    m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, delta));
  }
  float o[kPerLane];
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) o[e] = 0.f;
  float row_lse = -INFINITY;
  if (m != -INFINITY) {
    // expf(-inf - m) = 0 for the splits that saw nothing.
    const float w_lo = expf(lse_lo - m), w_hi = expf(lse_hi - m);
    float total = w_lo + w_hi;
#pragma unroll
    for (int delta = 16; delta > 0; delta /= 2) {
      total += __shfl_xor_sync(0xffffffffu, total, delta);
    }
    for (int first = 0; first < p.num_splits; first += kSplitsAtOnce) {
      if (first > 0) load(first, x);
#pragma unroll
      for (int i = 0; i < kSplitsAtOnce; ++i) {
        const int split = first + i;  // < 64; past num_splits x is 0
        const float weight =
            __shfl_sync(0xffffffffu, split < 32 ? w_lo : w_hi, split % 32);
#pragma unroll
        for (int e = 0; e < kPerLane; ++e) o[e] += weight * x[i][e];
      }
    }
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) o[e] /= total;
    row_lse = m + logf(total);
  }
  T* out = static_cast<T*>(p.out) + b * p.out_batch_stride +
           s * p.out_row_stride + h * p.out_head_stride + lane * kPerLane;
#pragma unroll
  for (int e = 0; e < kPerLane; e += 2) {
    *reinterpret_cast<uint32_t*>(out + e) = pack2<T>(o[e], o[e + 1]);
  }
  if (lane == 0) p.lse[row] = row_lse;
}

}  // namespace jax_flash
