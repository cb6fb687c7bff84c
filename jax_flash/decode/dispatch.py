"""Choosing the implementation of attention against a K/V cache.

Every implementation is a `CacheAttend`:

  attend(query, key_cache, value_cache, block_table, config, masks)
      -> (out (B, Sq, H, Dv) in query's dtype, lse (B, H, Sq) float32)

with query (B, Sq, H, D); the caches contiguous (B, S_max, Hkv, D|Dv) with
block_table None, or paged (num_blocks, block_size, Hkv, D|Dv) with
block_table (B, max_blocks) int32 whose entries may lie outside
[0, num_blocks) (an empty block: never read); config the validated
`AttentionConfig`; masks the `MaskArrays` of the call, always with
kv_lengths (B,) int32 in [0, capacity] (new tokens already appended; the
Sq queries are the last Sq of a row's keys), alibi_slopes (B, H) float32
or None, and nothing else. The caches are only read. The split-KV CUDA
kernel (`jax_flash.cuda.decode`) reads either layout in place, through the
block table; the other implementations see the paged cache gathered.
"""

from __future__ import annotations

from typing import Optional

import jax

from jax_flash import dispatch
from jax_flash.blockwise import blockwise_attention
from jax_flash.config import AttentionConfig, MaskArrays
from jax_flash.cuda import decode as cuda_decode
from jax_flash.cuda import decode_primitive
from jax_flash.decode.paged import CacheAttend, over_cache
from jax_flash.reference import reference_attention


def cuda_cache_attention(query: jax.Array, key_cache: jax.Array,
                         value_cache: jax.Array,
                         block_table: Optional[jax.Array],
                         config: AttentionConfig,
                         masks: MaskArrays) -> tuple[jax.Array, jax.Array]:
  """The split-KV CUDA kernel as a `CacheAttend`: reads the cache in place
  (batched, and sharded over batch rows and K/V heads, by the primitive's
  rules)."""
  return decode_primitive.decode_attention(query, key_cache, value_cache,
                                           masks.kv_lengths, config=config,
                                           block_table=block_table,
                                           alibi_slopes=masks.alibi_slopes)


def cuda_unsupported_reason(query: jax.Array, key_cache: jax.Array,
                            value_cache: jax.Array) -> Optional[str]:
  """None when the CUDA kernel serves this call here, else why not."""
  return (dispatch.cuda_unavailable_reason() or
          cuda_decode.unsupported_reason(query, key_cache, value_cache))


def select_cache_attention(implementation: Optional[str], query: jax.Array,
                           key_cache: jax.Array,
                           value_cache: jax.Array) -> CacheAttend:
  """The `CacheAttend` serving `implementation` (as in `flash_attention`).

  None picks the CUDA kernel where it serves the call, else the blockwise
  path; "cuda" raises when the kernel cannot serve it, saying why; "xla"
  runs the blockwise path on the (gathered) cache, "reference" the plain
  O(Sq * Sk) attention.
  """
  if implementation in (None, "cuda"):
    reason = cuda_unsupported_reason(query, key_cache, value_cache)
    if reason is None:
      return cuda_cache_attention
    if implementation == "cuda":
      raise ValueError(
          f"implementation='cuda' cannot serve this call: {reason}")
  if implementation == "reference":
    return over_cache(reference_attention)
  return over_cache(blockwise_attention)
