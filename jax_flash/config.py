"""The normalized form of an attention call, shared by every implementation.

`flash_attention` validates its arguments once and hands each implementation
the same two objects:

* `AttentionConfig`: static, hashable options (they select the compiled
  program and may be passed as `custom_vjp` non-differentiable arguments or
  FFI attributes);
* `MaskArrays`: the optional per-batch arrays, already given a batch
  dimension and canonical dtypes.

Letters: B batch, Sq query length, Sk key length, H query heads, Hkv key/value
heads (H % Hkv == 0), D query/key head dim, Dv value head dim.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import jax

MAX_HEAD_DIM = 256
"""Largest head dim (D and Dv) any implementation accepts."""


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  """Static options of one attention call.

  Attributes:
    softmax_scale: multiplies q.k before anything else.
    causal: bottom-right aligned causal mask (query i sees key j iff
      j <= i + offset, offset = kv_length - q_length of that batch row).
    window_left: keys further than this many positions to the left of the
      aligned diagonal are masked; -1 means unbounded.
    window_right: keys further than this many positions to the right of the
      aligned diagonal are masked; -1 means unbounded. `causal` is folded in by
      `effective_window`.
    softcap: if > 0, logits become softcap * tanh(logits / softcap) after
      scaling; 0 disables it.
    dropout_rate: probability of dropping an attention weight, in [0, 1).
    deterministic: ask for bitwise reproducible gradients.
  """

  softmax_scale: float
  causal: bool = False
  window_left: int = -1
  window_right: int = -1
  softcap: float = 0.0
  dropout_rate: float = 0.0
  deterministic: bool = False

  @property
  def effective_window(self) -> tuple[int, int]:
    """(left, right) window with `causal` folded into the right bound."""
    right = self.window_right
    if self.causal:
      right = 0 if right < 0 else min(right, 0)
    return self.window_left, right


class MaskArrays(NamedTuple):
  """Optional dynamic inputs of an attention call, batch dimension included.

  Attributes:
    alibi_slopes: (B, H) float32; adds -slope * |i + offset - j| to the logits.
    q_segment_ids: (B, Sq) int32; paired with kv_segment_ids.
    kv_segment_ids: (B, Sk) int32; a query sees only keys of its own id.
    q_lengths: (B,) int32; query rows at or past it output 0, lse -inf.
    kv_lengths: (B,) int32; keys at or past it are masked.
    dropout_seed: (2,) uint32 drawn from the dropout key; the keep mask is a
      fixed function of (seed, batch, head, query, key) positions, see
      `jax_flash.masking.dropout_keep`.
    q_offset: () int32, the position of the first query in a larger problem
      this call is one block of (None: 0).
    kv_offset: () int32, the position of the first key in that problem
      (None: 0). The offsets shift the distance of every key to the aligned
      diagonal by q_offset - kv_offset: causal, window and alibi then treat
      the call as that block of the larger problem (see `jax_flash.masking`;
      segment ids, lengths and the dropout hash keep the call's own
      positions). The CUDA kernels take them as one (B,) operand,
      q_offset - kv_offset (`jax_flash.cuda.lowering.position_offsets`).
  """

  alibi_slopes: Optional[jax.Array] = None
  q_segment_ids: Optional[jax.Array] = None
  kv_segment_ids: Optional[jax.Array] = None
  q_lengths: Optional[jax.Array] = None
  kv_lengths: Optional[jax.Array] = None
  dropout_seed: Optional[jax.Array] = None
  q_offset: Optional[jax.Array] = None
  kv_offset: Optional[jax.Array] = None
