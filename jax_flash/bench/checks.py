"""A cheap correctness check of every forward measurement.

A fast wrong kernel must not make the table: the runner compares the last
query rows of batch row 0 (where the bottom-right causal mask matters most)
with a float32 NumPy reference. Checking a few rows keeps the reference
O(rows·Sk) even at Sk = 128k.
"""

from __future__ import annotations

import numpy as np

CHECK_ROWS = 64
"""Query rows compared per forward measurement."""

MAX_RELATIVE_ERROR = 2e-2
"""Above this ‖out − ref‖/‖ref‖ a result is flagged: bf16 and fp16 kernels
land between 1e-3 and 1e-2 on random inputs."""


def reference_rows(q_rows: np.ndarray, k: np.ndarray, v: np.ndarray, *,
                   first_row: int, q_len: int, softmax_scale: float,
                   causal: bool) -> np.ndarray:
  """float32 attention output for some query rows of one batch row.

  Args:
    q_rows: (R, H, D) queries at positions first_row … first_row + R - 1.
    k: (Sk, Hkv, D) keys.
    v: (Sk, Hkv, Dv) values.
    first_row: position of q_rows[0] among the Sq queries.
    q_len: Sq, for the bottom-right alignment of the causal mask.
    softmax_scale: multiplies q·k.
    causal: bottom-right aligned causal mask.

  Returns:
    (R, H, Dv) float32.
  """
  rows, heads, _ = q_rows.shape
  kv_len, kv_heads, value_dim = v.shape
  group = heads // kv_heads
  # Query head h reads K/V head h // group: stack each group's rows so one
  # matrix product per K/V head serves them all, without repeating K and V.
  q_grouped = q_rows.astype(np.float32).reshape(rows, kv_heads, group, -1)
  q_grouped = q_grouped.transpose(1, 2, 0, 3).reshape(kv_heads, group * rows, -1)
  logits = q_grouped @ k.astype(np.float32).transpose(1, 2, 0)  # S = Q @ K^T
  logits *= softmax_scale
  if causal:
    positions = np.tile(np.arange(first_row, first_row + rows), group)
    visible = np.arange(kv_len)[None, :] <= positions[:, None] + (kv_len - q_len)
    logits = np.where(visible[None], logits, -np.inf)
  logits -= logits.max(axis=-1, keepdims=True)
  weights = np.exp(logits)
  weights /= weights.sum(axis=-1, keepdims=True)
  out = weights @ v.astype(np.float32).transpose(1, 0, 2)  # O = P @ V
  return out.reshape(kv_heads, group, rows, value_dim).transpose(2, 0, 1, 3).reshape(
      rows, heads, value_dim)


def relative_error(out: np.ndarray, q: np.ndarray, k: np.ndarray,
                   v: np.ndarray, *, softmax_scale: float,
                   causal: bool) -> float:
  """‖out − ref‖/‖ref‖ over the last `CHECK_ROWS` query rows of batch row 0.

  Args:
    out: (Sq, H, Dv) output of batch row 0, any float dtype.
    q: (Sq, H, D) queries of batch row 0.
    k: (Sk, Hkv, D) keys of batch row 0.
    v: (Sk, Hkv, Dv) values of batch row 0.
    softmax_scale: multiplies q·k.
    causal: bottom-right aligned causal mask.

  Returns:
    The relative L2 error as a float (inf when out has non-finite values).
  """
  q_len = q.shape[0]
  first_row = max(q_len - CHECK_ROWS, 0)
  expected = reference_rows(q[first_row:], k, v, first_row=first_row,
                            q_len=q_len, softmax_scale=softmax_scale,
                            causal=causal)
  got = np.asarray(out[first_row:], np.float32)
  if not np.all(np.isfinite(got)):
    return float("inf")
  return float(np.linalg.norm(got - expected) / np.linalg.norm(expected))
