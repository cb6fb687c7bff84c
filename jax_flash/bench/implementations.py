"""Every attention a JAX user can pick, behind one small interface.

Each implementation says whether it can run a case (and if not, why: the
reason is printed in the report) and builds `attend(q, k, v) -> out` for it.
JAX implementations take (B, S, H, D) arrays; PyTorch ones take the same
memory layout viewed as (B, H, S, D), as `scaled_dot_product_attention`
expects. Failures at compile or run time are caught by the runner and also
become notes, so an implementation missing from an install never stops a run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import sys
import types
from typing import Any, Callable, Optional

from jax_flash.bench.cases import Case

Attend = Callable[[Any, Any, Any], Any]

MOSAIC_BLOCK_Q = 64
"""Mosaic GPU attention query tile per warpgroup (two warpgroups per CTA)."""

MOSAIC_BLOCK_KV = 128
"""Mosaic GPU attention key tile; JAX's own example benchmark starts here."""

MOSAIC_BLOCK_BWD = 64
"""Mosaic GPU attention tiles of both backward kernels."""

TRITON_MIN_BLOCK = 16
"""Smallest tile `tl.dot` accepts, so the Triton kernel needs Sq >= 16."""

SPLIT_KV_TARGET_CTAS = 132
"""flash_attn3_jax's `flash_mha_with_kvcache` has no split heuristic: its
key range is split so that B·Hkv·splits fills the 132 SMs of an H100/H200."""

PAGE_TABLE_SEED = 0
"""Seed of the shuffled block order of paged decoding cases."""


@dataclasses.dataclass(frozen=True)
class Implementation:
  """One attention implementation.

  Attributes:
    name: short key used on the command line and in the JSON.
    label: column heading in the tables and legend in the plots.
    framework: "jax" or "torch".
    ours: True for jax_flash's own implementations.
    dtype: input dtype it must run in, overriding the case's (None: any).
    applies_scale: False when the kernel has no softmax scale argument; the
      runner then folds the scale into the query inputs.
    needs_gpu: skip without trying when no GPU is present.
    paged: reads a paged K/V cache through a block table (decoding cases
      with `page_size` run only on these).
    skip_reason: `skip_reason(case, mode)` returns why the case is known
      not to run, or None.
    build: `build(case)` returns `attend`, importing what it needs.
    context: returns a context manager entered around each measurement.
  """

  name: str
  label: str
  framework: str
  ours: bool
  build: Callable[[Case], Attend]
  dtype: Optional[str] = None
  applies_scale: bool = True
  needs_gpu: bool = True
  paged: bool = False
  skip_reason: Callable[[Case, str], Optional[str]] = lambda case, mode: None
  context: Callable[[], Any] = contextlib.nullcontext


def _jax_flash(implementation: str,
               deterministic: bool = False) -> Callable[[Case], Attend]:
  def build(case: Case) -> Attend:
    import jax_flash  # pylint: disable=import-outside-toplevel
    def attend(q, k, v):
      return jax_flash.flash_attention(q, k, v, causal=case.causal,
                                       implementation=implementation,
                                       deterministic=deterministic)
    return attend
  return build


def page_table(case: Case) -> Any:
  """(B, Sk / page_size) int32 block ids of a paged case: row b owns blocks
  b·n … b·n + n - 1 of the pool, visited in a shuffled order. Without a
  causal mask or position-dependent scores the output does not depend on
  the order of the keys, so the result equals the contiguous one while the
  reads are scattered as in a real pool."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  per_row = case.kv_len // case.page_size
  rng = np.random.default_rng(PAGE_TABLE_SEED)
  rows = [b * per_row + rng.permutation(per_row) for b in range(case.batch)]
  return np.stack(rows).astype(np.int32)


def _as_pool(case: Case, cache: Any) -> Any:
  """(B, Sk, Hkv, D) viewed as a pool (B·Sk / page_size, page_size, Hkv, D)."""
  return cache.reshape((-1, case.page_size) + cache.shape[2:])


def _jax_flash_kv_cache(implementation: str) -> Callable[[Case], Attend]:
  def build(case: Case) -> Attend:
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    import jax_flash  # pylint: disable=import-outside-toplevel
    table = jnp.asarray(page_table(case)) if case.page_size else None
    lengths = jnp.full((case.batch,), case.kv_len, jnp.int32)
    def attend(q, k, v):
      if table is not None:
        k, v = _as_pool(case, k), _as_pool(case, v)
      return jax_flash.flash_attention_with_kv_cache(
          q, k, v, cache_seq_lengths=lengths, block_table=table,
          causal=case.causal, implementation=implementation).out
    return attend
  return build


def _import_flash_attn3() -> Any:
  """flash_attn3_jax (FlashAttention-3's kernels in JAX), importable on the
  JAX versions we support."""
  core = importlib.import_module("jax.core")
  if not hasattr(core, "ShapedArray"):
    # The wheel imports jax.core.ShapedArray, no longer public in new JAX.
    core.ShapedArray = importlib.import_module("jax._src.core").ShapedArray
  return importlib.import_module("flash_attn3_jax")


def _flash_attn3(case: Case) -> Attend:
  module = _import_flash_attn3()
  def attend(q, k, v):
    return module.flash_mha(q, k, v, softmax_scale=case.softmax_scale,
                            is_causal=case.causal)
  return attend


def _import_tokamax() -> Any:
  """tokamax; it imports xprof at load time for its own benchmarking, which
  its attention does not use: a stand-in module serves where xprof is not
  installed."""
  try:
    importlib.import_module("xprof.cli.tools")
  except ImportError:
    for name in ("xprof", "xprof.cli", "xprof.cli.tools"):
      sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["xprof.cli.tools"].get_kernel_stats_tool = None
  return importlib.import_module("tokamax")


def _tokamax(implementation: str) -> Callable[[Case], Attend]:
  def build(case: Case) -> Attend:
    module = _import_tokamax()
    def attend(q, k, v):
      return module.dot_product_attention(q, k, v, is_causal=case.causal,
                                          implementation=implementation)
    return attend
  return build


def _flash_attn3_kv_cache(case: Case) -> Attend:
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  module = _import_flash_attn3()
  table = jnp.asarray(page_table(case)) if case.page_size else None
  lengths = jnp.full((case.batch,), case.kv_len, jnp.int32)
  splits = max(1, -(-SPLIT_KV_TARGET_CTAS // (case.batch * case.kv_heads)))
  def attend(q, k, v):
    if table is not None:
      k, v = _as_pool(case, k), _as_pool(case, v)
    return module.flash_mha_with_kvcache(
        q, k, v, cache_seqlens=lengths, page_table=table,
        softmax_scale=case.softmax_scale, is_causal=case.causal,
        num_splits=splits)
  return attend


def _decode_only(case: Case, mode: str) -> Optional[str]:
  del mode
  return None if case.kind == "decode" else "a K/V-cache API (decoding only)"


def _jax_nn(implementation: str) -> Callable[[Case], Attend]:
  def build(case: Case) -> Attend:
    import jax  # pylint: disable=import-outside-toplevel
    def attend(q, k, v):
      return jax.nn.dot_product_attention(
          q, k, v, is_causal=case.causal, implementation=implementation)
    return attend
  return build


def _pallas_triton(case: Case) -> Attend:
  module = importlib.import_module("jax.experimental.pallas.ops.gpu.attention")
  def attend(q, k, v):
    return module.mha(q, k, v, None, sm_scale=case.softmax_scale,
                      causal=case.causal)
  return attend


def _pallas_triton_skip(case: Case, mode: str) -> Optional[str]:
  del mode
  if case.kv_heads != case.heads:
    return "no GQA: needs as many K/V heads as query heads"
  if case.q_len < TRITON_MIN_BLOCK:
    return f"needs Sq >= {TRITON_MIN_BLOCK}"
  return None


def _pallas_mosaic(case: Case) -> Attend:
  module = importlib.import_module(
      "jax.experimental.pallas.ops.gpu.attention_mgpu")
  config = module.TuningConfig(
      block_q=MOSAIC_BLOCK_Q, block_kv=MOSAIC_BLOCK_KV, max_concurrent_steps=2,
      causal=case.causal, block_q_dkv=MOSAIC_BLOCK_BWD,
      block_kv_dkv=MOSAIC_BLOCK_BWD, block_q_dq=MOSAIC_BLOCK_BWD,
      block_kv_dq=MOSAIC_BLOCK_BWD)
  def attend(q, k, v):
    return module.attention(q, k, v, config)
  return attend


def _pallas_mosaic_skip(case: Case, mode: str) -> Optional[str]:
  if case.causal and mode != "fwd":
    return "no causal backward"
  if case.q_len % (2 * MOSAIC_BLOCK_Q):
    return f"needs Sq to be a multiple of {2 * MOSAIC_BLOCK_Q}"
  return None


def _torch_sdpa(case: Case) -> Attend:
  functional = importlib.import_module("torch.nn.functional")
  # Older PyTorch releases lack enable_gqa: pass it only when needed.
  extra = {"enable_gqa": True} if case.kv_heads != case.heads else {}
  def attend(q, k, v):
    return functional.scaled_dot_product_attention(
        q, k, v, is_causal=case.causal, scale=case.softmax_scale, **extra)
  return attend


def _torch_backend(backend: str) -> Callable[[], Any]:
  def context():
    attention = importlib.import_module("torch.nn.attention")
    return attention.sdpa_kernel(getattr(attention.SDPBackend, backend))
  return context


def _torch_skip(case: Case, mode: str) -> Optional[str]:
  del mode
  if case.causal and case.q_len != case.kv_len:
    return "is_causal is top-left aligned when Sq != Sk"
  return None


IMPLEMENTATIONS: tuple[Implementation, ...] = (
    # Tried everywhere: when the kernels cannot run, jax_flash's own error
    # says why, and that reason is the note.
    Implementation("jax_flash_cuda", "jax_flash CUDA", "jax", True,
                   _jax_flash("cuda"), needs_gpu=False),
    # Bitwise reproducible gradients (a fixed dQ reduction order); the
    # forward is the same kernel.
    Implementation("jax_flash_cuda_det", "jax_flash CUDA deterministic",
                   "jax", True, _jax_flash("cuda", deterministic=True),
                   needs_gpu=False),
    Implementation("jax_flash_xla", "jax_flash blockwise", "jax", True,
                   _jax_flash("xla"), needs_gpu=False),
    Implementation("jax_flash_kvcache_cuda", "jax_flash KV cache CUDA", "jax",
                   True, _jax_flash_kv_cache("cuda"), needs_gpu=False,
                   paged=True, skip_reason=_decode_only),
    Implementation("jax_flash_kvcache_xla", "jax_flash KV cache blockwise",
                   "jax", True, _jax_flash_kv_cache("xla"), needs_gpu=False,
                   paged=True, skip_reason=_decode_only),
    Implementation("jax_cudnn", "cuDNN (jax.nn)", "jax", False,
                   _jax_nn("cudnn")),
    Implementation("jax_xla", "XLA (jax.nn)", "jax", False, _jax_nn("xla"),
                   needs_gpu=False),
    Implementation("pallas_triton", "Pallas Triton", "jax", False,
                   _pallas_triton, skip_reason=_pallas_triton_skip),
    Implementation("pallas_mosaic", "Pallas Mosaic fp16", "jax", False,
                   _pallas_mosaic, dtype="float16", applies_scale=False,
                   skip_reason=_pallas_mosaic_skip),
    # These three are skipped with a note where flash_attn3_jax or tokamax
    # is not installed (docs/performance.md says how to install them).
    Implementation("fa3_jax", "flash-attn3-jax", "jax", False, _flash_attn3),
    # tokamax applies 1/sqrt(D), the scale of every case.
    Implementation("tokamax_mosaic", "tokamax mosaic", "jax", False,
                   _tokamax("mosaic")),
    Implementation("tokamax_triton", "tokamax triton", "jax", False,
                   _tokamax("triton")),
    # Skipped with a note when flash_attn3_jax is not installed.
    Implementation("fa3_kvcache", "flash-attn3-jax KV cache", "jax", False,
                   _flash_attn3_kv_cache, paged=True,
                   skip_reason=_decode_only),
    Implementation("torch_flash", "torch SDPA flash", "torch", False,
                   _torch_sdpa, skip_reason=_torch_skip,
                   context=_torch_backend("FLASH_ATTENTION")),
    Implementation("torch_cudnn", "torch SDPA cuDNN", "torch", False,
                   _torch_sdpa, skip_reason=_torch_skip,
                   context=_torch_backend("CUDNN_ATTENTION")),
)
"""All implementations, jax_flash's first."""


def by_name(names: Optional[list[str]] = None) -> list[Implementation]:
  """The implementations named (all when `names` is None), in table order."""
  if names is None:
    return list(IMPLEMENTATIONS)
  known = {impl.name for impl in IMPLEMENTATIONS}
  unknown = sorted(set(names) - known)
  if unknown:
    raise ValueError(f"unknown implementations {unknown}; known: {sorted(known)}")
  return [impl for impl in IMPLEMENTATIONS if impl.name in names]
