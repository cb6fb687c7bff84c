"""Which attention calls one ring step makes, and which of them a mask hides.

Shard i holds the queries of its part of the sequence; at each step it also
holds the key/value block of some shard s. A step is a short list of `Term`s,
each one attention call between a piece of the local queries and a piece of
the block in hand, active or skipped depending on (i, s).

The pieces are the contiguous runs of the global sequence a shard holds: its
whole block, or with load balancing the two half-blocks (global chunks i and
2n - 1 - i of 2n). The formulations, by mask:

* no causal, window or alibi: the whole block, always;
* causal alone (equal global lengths, so the diagonal is i == j): a pair of
  pieces is fully visible, fully hidden, or on the diagonal (plain causal
  with equal lengths). Contiguous: s == i causal, s < i unmasked, s > i
  skipped. Load balanced: s == i causal over the whole block (the local order
  of the two chunks is the global order), s < i all queries to the first
  key chunk, s > i the last query chunk to all keys: every step does a
  quarter of a block's work, and no call needs a position offset;
* window or alibi: every pair of pieces with its global position offsets,
  skipped when the window hides it. The CUDA kernels take the offsets as an
  operand (traced: they depend on the shard index), so these calls run on
  whichever implementation serves the rest of the arguments.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Optional, Union

import jax
import jax.numpy as jnp

from jax_flash import masking
from jax_flash.config import AttentionConfig, MaskArrays

Index = Union[int, jax.Array]
AxisName = Union[str, tuple[str, ...]]


class When(enum.Enum):
  """When a term is active, given this shard i and the block's source s."""

  ALWAYS = "always"
  DIAGONAL = "s == i"
  BEFORE = "s < i"
  AFTER = "s > i"
  IN_WINDOW = "the window sees the pieces"


@dataclasses.dataclass(frozen=True)
class Term:
  """One attention call of a step.

  Attributes:
    q_piece: the local query piece (0 or 1 under load balancing), or None
      for all local queries.
    k_piece: the piece of the key/value block in hand, or None for all.
    config: the static options of the call.
    when: when it is active.
  """

  q_piece: Optional[int]
  k_piece: Optional[int]
  config: AttentionConfig
  when: When


@dataclasses.dataclass(frozen=True)
class RingPlan:
  """The static description of one ring attention call.

  Attributes:
    axis_name: the mesh axis (or axes) the sequence is split over.
    num_shards: n, its size.
    local_len: S / n, the local query and key length.
    load_balanced: shards hold chunks i and 2n - 1 - i of 2n.
    config: the options of the whole attention.
    has_alibi: alibi slopes are given.
    implementation: as `flash_attention`'s, chosen per term.
  """

  axis_name: AxisName
  num_shards: int
  local_len: int
  load_balanced: bool
  config: AttentionConfig
  has_alibi: bool
  implementation: Optional[str]

  @property
  def piece_len(self) -> int:
    """Length of one contiguous run of the global sequence a shard holds."""
    return self.local_len // 2 if self.load_balanced else self.local_len

  def rows(self, piece: Optional[int]) -> slice:
    """The local rows of a piece (None: all)."""
    if piece is None:
      return slice(None)
    return slice(piece * self.piece_len, (piece + 1) * self.piece_len)

  def length(self, piece: Optional[int]) -> int:
    """The number of local rows of a piece (None: all)."""
    return self.local_len if piece is None else self.piece_len

  def start(self, shard: Index, piece: Optional[int]) -> Index:
    """Global position of the first element of a shard's piece (None: of
    its first piece)."""
    if not self.load_balanced:
      return shard * self.local_len
    chunk = shard if piece in (None, 0) else 2 * self.num_shards - 1 - shard
    return chunk * self.piece_len

  def terms(self) -> tuple[Term, ...]:
    """The attention calls of every step (see the module docstring)."""
    config = self.config
    if config.effective_window == (-1, -1) and not self.has_alibi:
      return (Term(None, None, config, When.ALWAYS),)
    if config.effective_window == (-1, 0) and not self.has_alibi:
      unmasked = dataclasses.replace(config, causal=False, window_left=-1,
                                     window_right=-1)
      terms = [Term(None, None, config, When.DIAGONAL)]
      if self.load_balanced:
        return tuple(terms + [Term(None, 0, unmasked, When.BEFORE),
                              Term(1, None, unmasked, When.AFTER)])
      return tuple(terms + [Term(None, None, unmasked, When.BEFORE)])
    pieces = (0, 1) if self.load_balanced else (None,)
    return tuple(Term(qp, kp, config, When.IN_WINDOW)
                 for qp in pieces for kp in pieces)

  def offsets(self, term: Term, shard: Index,
              source: Index) -> tuple[Index, Index]:
    """Global positions of the term's first query and first key."""
    return self.start(shard, term.q_piece), self.start(source, term.k_piece)

  def active(self, term: Term, shard: Index,
             source: Index) -> Union[bool, jax.Array]:
    """Whether the term computes anything (a Python bool when static)."""
    if term.when is When.ALWAYS:
      return True
    if term.when is When.DIAGONAL:
      return source == shard
    if term.when is When.BEFORE:
      return source < shard
    if term.when is When.AFTER:
      return source > shard
    q_start, k_start = self.offsets(term, shard, source)
    q_len, k_len = self.length(term.q_piece), self.length(term.k_piece)
    return masking.window_sees(term.config,
                               q_start - (k_start + k_len - 1),
                               q_start + q_len - 1 - k_start)

  def term_masks(self, term: Term, masks: MaskArrays,
                 kv_segment_ids: Optional[jax.Array], shard: Index,
                 source: Index) -> MaskArrays:
    """The mask arrays of one term's call: its pieces' segment ids, and the
    position offsets where the term needs them."""
    q_ids = masks.q_segment_ids
    if q_ids is not None:
      q_ids = q_ids[:, self.rows(term.q_piece)]
      kv_segment_ids = kv_segment_ids[:, self.rows(term.k_piece)]
    masks = masks._replace(q_segment_ids=q_ids, kv_segment_ids=kv_segment_ids)
    if term.when is not When.IN_WINDOW:
      return masks
    q_offset, kv_offset = self.offsets(term, shard, source)
    return masks._replace(q_offset=jnp.asarray(q_offset, jnp.int32),
                          kv_offset=jnp.asarray(kv_offset, jnp.int32))
