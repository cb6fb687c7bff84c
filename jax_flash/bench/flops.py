"""Exact work counts for attention benchmarks.

FlashAttention's convention: the forward pass does two matrix products over
the visible (query, key) pairs, `2·D` FLOPs for q·k and `2·Dv` for p·v per
pair, i.e. `4·B·H·pairs·D` when `D == Dv`; the backward pass counts as 2.5
forwards (five products instead of two). The pairs are counted exactly, per
query row, with the bottom-right aligned causal mask and sliding window that
`jax_flash.flash_attention` uses, so causal attention is not simply "half".
"""

from __future__ import annotations

import numpy as np

BACKWARD_FLOP_FACTOR = 2.5
"""Backward FLOPs over forward FLOPs (five matrix products against two)."""


def visible_pairs(q_len: int, kv_len: int, *, causal: bool = False,
                  window: tuple[int, int] = (-1, -1)) -> int:
  """Number of (query, key) pairs one head of one batch row attends to.

  Query i sees key j iff `-left <= j - (i + kv_len - q_len) <= right`, each
  bound ignored when negative; `causal` forces `right = 0`.

  Args:
    q_len: query length Sq.
    kv_len: key length Sk.
    causal: bottom-right aligned causal mask.
    window: (left, right) sliding window, -1 for unbounded.

  Returns:
    The count of visible pairs, between 0 and `q_len * kv_len`.
  """
  left, right = window
  if causal:
    right = 0 if right < 0 else min(right, 0)
  diagonal = np.arange(q_len, dtype=np.int64) + (kv_len - q_len)
  first = np.zeros(q_len, np.int64) if left < 0 else np.maximum(diagonal - left, 0)
  last = (np.full(q_len, kv_len - 1, np.int64) if right < 0
          else np.minimum(diagonal + right, kv_len - 1))
  return int(np.maximum(last - first + 1, 0).sum())


def attention_flops(batch: int, heads: int, q_len: int, kv_len: int,
                    head_dim: int, *, value_dim: int | None = None,
                    causal: bool = False, window: tuple[int, int] = (-1, -1),
                    mode: str = "fwd") -> int:
  """FLOPs of one attention call in FlashAttention's convention.

  GQA needs no special case: every query head does its own products, so
  `heads` is the number of query heads whatever the number of K/V heads.

  Args:
    batch: B.
    heads: query heads H.
    q_len: Sq.
    kv_len: Sk.
    head_dim: D of q and k.
    value_dim: Dv; defaults to `head_dim`.
    causal: bottom-right aligned causal mask.
    window: (left, right) sliding window, -1 for unbounded.
    mode: "fwd", "bwd" or "fwd_bwd".

  Returns:
    The FLOP count as a Python int.
  """
  value_dim = head_dim if value_dim is None else value_dim
  pairs = visible_pairs(q_len, kv_len, causal=causal, window=window)
  forward = 2 * batch * heads * pairs * (head_dim + value_dim)
  factors = {"fwd": 1.0, "bwd": BACKWARD_FLOP_FACTOR,
             "fwd_bwd": 1.0 + BACKWARD_FLOP_FACTOR}
  if mode not in factors:
    raise ValueError(f"mode must be one of {sorted(factors)}, got {mode!r}")
  return int(forward * factors[mode])


def kv_read_bytes(batch: int, kv_len: int, kv_heads: int, head_dim: int, *,
                  value_dim: int | None = None, itemsize: int = 2) -> int:
  """Bytes of K and V one decoding step must read at least once."""
  value_dim = head_dim if value_dim is None else value_dim
  return batch * kv_len * kv_heads * (head_dim + value_dim) * itemsize
