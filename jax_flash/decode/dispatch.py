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
or None, and nothing else. The caches are only read. A split-KV CUDA kernel
joins by returning its function from `select_cache_attention`.
"""

from __future__ import annotations

from typing import Optional

from jax_flash import dispatch
from jax_flash.blockwise import blockwise_attention
from jax_flash.decode.paged import CacheAttend, over_cache
from jax_flash.reference import reference_attention

NO_CUDA_KERNEL = "flash_attention_with_kv_cache has no CUDA path yet"


def select_cache_attention(implementation: Optional[str]) -> CacheAttend:
  """The `CacheAttend` serving `implementation` (as in `flash_attention`).

  None and "xla" run the blockwise path on the (gathered) cache,
  "reference" the plain O(Sq * Sk) attention; "cuda" raises, saying why.
  """
  if implementation == "cuda":
    reason = dispatch.cuda_unavailable_reason() or NO_CUDA_KERNEL
    raise ValueError(f"implementation='cuda' cannot serve this call: {reason}")
  if implementation == "reference":
    return over_cache(reference_attention)
  return over_cache(blockwise_attention)
