"""The benchmark grid: which attention problems are measured.

Letters as in `jax_flash.config`: B batch, Sq/Sk query/key length, H query
heads, Hkv key/value heads, D head dim.
"""

from __future__ import annotations

import dataclasses
import math

MODES = ("fwd", "bwd", "fwd_bwd")
"""Forward only, backward only (from saved residuals), forward+backward."""

TOKENS = 16 * 1024
"""B·S of every training-shape case: the batch shrinks as S grows."""

MODEL_WIDTH = 2048
"""H·D of every training-shape case: the heads shrink as D grows."""

GQA_GROUP = 8
"""Query heads per K/V head in the GQA cases."""


@dataclasses.dataclass(frozen=True)
class Case:
  """One attention problem.

  Attributes:
    kind: "mha" (training shapes), "gqa" (training shapes, grouped K/V
      heads) or "decode" (a few query tokens against a long K/V cache).
    batch: B.
    q_len: Sq.
    kv_len: Sk.
    heads: H.
    kv_heads: Hkv.
    head_dim: D (= Dv).
    causal: bottom-right aligned causal mask.
    dtype: name of the input dtype ("bfloat16" or "float16").
    page_size: decoding only: block size of a paged K/V cache, whose block
      table visits each row's blocks in a shuffled order; 0 for a
      contiguous cache.
  """

  kind: str
  batch: int
  q_len: int
  kv_len: int
  heads: int
  kv_heads: int
  head_dim: int
  causal: bool
  dtype: str = "bfloat16"
  page_size: int = 0

  @property
  def softmax_scale(self) -> float:
    """The usual 1/sqrt(D)."""
    return 1.0 / math.sqrt(self.head_dim)

  @property
  def modes(self) -> tuple[str, ...]:
    """Modes measured for this case: decoding is inference only."""
    return ("fwd",) if self.kind == "decode" else MODES

  def with_dtype(self, dtype: str) -> Case:
    """The same problem in another input dtype."""
    return dataclasses.replace(self, dtype=dtype)

  def label(self) -> str:
    """A short human-readable name, used in logs."""
    mask = "causal" if self.causal else "full"
    paged = f" paged{self.page_size}" if self.page_size else ""
    return (f"{self.kind} B={self.batch} Sq={self.q_len} Sk={self.kv_len} "
            f"H={self.heads}/{self.kv_heads} D={self.head_dim} {mask} "
            f"{self.dtype}{paged}")


def training_cases(head_dims: tuple[int, ...], seq_lens: tuple[int, ...], *,
                   masks: tuple[bool, ...] = (False, True), kind: str = "mha",
                   tokens: int = TOKENS, width: int = MODEL_WIDTH,
                   group: int = 1) -> list[Case]:
  """Cases with B·S = tokens and H·D = width, Sq = Sk = S.

  Args:
    head_dims: values of D.
    seq_lens: values of S.
    masks: causal flags to measure.
    kind: "mha", or "gqa" when group > 1.
    tokens: B·S.
    width: H·D.
    group: query heads per K/V head.

  Returns:
    The cases, ordered by D, then mask, then S.
  """
  cases = []
  for head_dim in head_dims:
    heads = max(width // head_dim, group)
    for causal in masks:
      for seq_len in seq_lens:
        cases.append(Case(kind, max(tokens // seq_len, 1), seq_len, seq_len,
                          heads, heads // group, head_dim, causal))
  return cases


def decode_cases(kv_lens: tuple[int, ...], *, batch: int = 4,
                 q_len: int = 1, page_size: int = 0, heads: int = 32,
                 kv_heads: int = 8, head_dim: int = 128) -> list[Case]:
  """Sq new tokens per sequence (1, or a few for speculative decoding)
  against K/V caches of length Sk, contiguous or paged.

  The default shape is a Llama-3-8B layer: 32 query heads, 8 K/V heads, D 128.
  """
  return [Case("decode", batch, q_len, kv_len, heads, kv_heads, head_dim,
               False, page_size=page_size) for kv_len in kv_lens]


SEQ_LENS = (512, 1024, 2048, 4096, 8192, 16384)
"""S of the published grid's MHA cases."""

DECODE_LENS = (8192, 32768, 131072)
"""Sk of the published grid's decoding cases."""


def default_grid() -> list[Case]:
  """The published grid, the headline D = 128 cases first.

  D 64/128/256 × S 512…16k × causal and not (MHA); GQA with 8 query heads
  per K/V head at D = 128; decoding (32 query heads over 8 K/V heads, D =
  128): B = 4 with one new token at Sk 8k/32k/128k, B = 64 at Sk 4k, four
  speculative tokens, and paged caches of blocks of 16 and 64.
  """
  return (training_cases((128,), SEQ_LENS)
          + training_cases((128,), (1024, 4096, 16384), kind="gqa",
                           group=GQA_GROUP)
          + decode_cases(DECODE_LENS)
          + decode_cases((4096,), batch=64)
          + decode_cases(DECODE_LENS, q_len=4)
          + decode_cases(DECODE_LENS, page_size=16)
          + decode_cases(DECODE_LENS, page_size=64)
          + training_cases((64, 256), SEQ_LENS))


def quick_grid() -> list[Case]:
  """Tiny cases that run on a CPU in seconds: a smoke test of the harness
  (one causal MHA case, one GQA case, one decoding case)."""
  return (training_cases((32,), (64,), masks=(True,), tokens=128, width=64)
          + training_cases((32,), (64,), masks=(False,), kind="gqa",
                           tokens=128, width=128, group=2)
          + decode_cases((128,), batch=2, heads=4, kv_heads=2, head_dim=32))
