"""The split-KV decoding kernel (csrc/sm80/flash_decode_kernel.h) as a call.

`jax_flash_decode` computes a few query rows against a long K/V cache,
contiguous (B, S_max, Hkv, D) or paged (num_blocks, block_size, Hkv, D) with
a block table, reading K/V once for all the query heads that share them (see
csrc/common/decode_params.h for the layouts and conventions). It serves:

* the forward of `flash_attention` for short queries (Sq <= MAX_QUERY_ROWS),
  chosen in `lowering.forward_call` on local shapes, so the forward
  primitive's batching and sharding rules apply unchanged (its backward is
  the training kernel's, from the same out and lse);
* `flash_attention_with_kv_cache`, contiguous or paged, through the
  primitive of `decode_primitive` (its batching and sharding rules end in
  `decode_call` on local shapes).

It is chosen wherever it serves a call; JAX_FLASH_DECODE_KERNEL=0 turns it
off (`enabled`), leaving short queries to the training kernel and paged
caches to the blockwise path.
"""

from __future__ import annotations

import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jax_flash.config import AttentionConfig
from jax_flash.cuda import library, lowering

MAX_QUERY_ROWS = 16
"""Longest query (Sq) the decoding kernel takes."""

ENABLE_ENV_VAR = "JAX_FLASH_DECODE_KERNEL"


def enabled() -> bool:
  """Whether the decoding kernel may be chosen (not JAX_FLASH_DECODE_KERNEL=0)."""
  return os.environ.get(ENABLE_ENV_VAR, "1").strip().lower() not in (
      "0", "false", "off", "no")


def built(dtype: jnp.dtype, head_dim: int) -> bool:
  """Whether the loaded library holds the decoding kernel for (dtype, D)."""
  name = library.DTYPE_NAMES.get(jnp.dtype(dtype))
  if name is None or library.load_error() is not None:
    return False
  return bool(library.load().build_info.kernel_archs("decode", name,
                                                     head_dim))


def unsupported_reason(q: jax.Array, k_cache: jax.Array,
                       v_cache: jax.Array) -> Optional[str]:
  """None when the decoding kernel can serve query `q` against these caches
  (either layout), else why not. Says nothing of the library or the
  backend (`jax_flash.cuda.unavailable_reason` does)."""
  if not enabled():
    return f"the split-KV decoding kernel is turned off ({ENABLE_ENV_VAR}=0)"
  if q.shape[1] > MAX_QUERY_ROWS:
    return f"a query of {q.shape[1]} tokens (the kernel takes {MAX_QUERY_ROWS})"
  if not q.shape[3] == k_cache.shape[3] == v_cache.shape[3]:
    return "value head dim != query head dim"
  if not (q.dtype == k_cache.dtype == v_cache.dtype):
    return "query and caches of different dtypes"
  if not built(q.dtype, q.shape[3]):
    return (f"no decoding kernel built for {jnp.dtype(q.dtype).name} at head "
            f"dim {q.shape[3]}")
  return None


def covers(q: jax.Array, k: jax.Array, v: jax.Array,
           mask_names: tuple[str, ...]) -> bool:
  """Whether a forward call with these local operands runs the decode kernel:
  `unsupported_reason` finds nothing and the only mask arrays are alibi
  slopes and key lengths."""
  return (set(mask_names) <= {"alibi_slopes", "kv_lengths"} and
          unsupported_reason(q, k, v) is None)


def decode_call(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                seq_lengths: jax.Array, *, config: AttentionConfig,
                block_table: Optional[jax.Array] = None,
                alibi_slopes: Optional[jax.Array] = None
                ) -> tuple[jax.Array, jax.Array]:
  """`jax_flash_decode` on local shapes: (out (B, Sq, H, D), lse (B, H, Sq)).

  Args:
    q: (B, Sq, H, D) bfloat16 or float16.
    k_cache, v_cache: (B, S_max, Hkv, D), or (num_blocks, block_size, Hkv,
      D) with `block_table`.
    seq_lengths: (B,) int32 valid keys per row (the Sq queries are the last
      Sq of them); clamped to [0, capacity] by the kernel.
    config: scale, window (causal folded in) and softcap; nothing else of it
      applies.
    block_table: (B, max_blocks) int32 for a paged cache; ids outside
      [0, num_blocks) are read as empty blocks.
    alibi_slopes: (B, H) float32 or None.
  """
  batch, sq, heads, head_dim = q.shape
  kv_heads = k_cache.shape[2]
  capacity = (k_cache.shape[1] if block_table is None
              else block_table.shape[1] * k_cache.shape[1])
  workspace = library.decode_workspace_bytes(batch, sq, heads, kv_heads,
                                             head_dim, capacity)
  optional = {}
  if block_table is not None:
    optional["block_table"] = block_table.astype(jnp.int32)
  if alibi_slopes is not None:
    optional["alibi_slopes"] = alibi_slopes.astype(jnp.float32)
  left, right = config.effective_window
  results = (jax.ShapeDtypeStruct(q.shape, q.dtype),
             jax.ShapeDtypeStruct((batch, heads, sq), jnp.float32),
             jax.ShapeDtypeStruct((workspace,), jnp.uint8))
  out, lse, _ = lowering.DECODE(
      results, (q, k_cache, v_cache, seq_lengths.astype(jnp.int32)),
      optional,
      dict(softmax_scale=np.float32(config.softmax_scale),
           window_left=np.int32(left), window_right=np.int32(right),
           softcap=np.float32(config.softcap)))
  return out, lse
