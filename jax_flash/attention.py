"""The public entry point: `flash_attention`."""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp

from jax_flash import dispatch, validation
from jax_flash.config import AttentionConfig, MaskArrays

Implementation = Optional[Literal["xla", "reference", "cuda"]]
SegmentIds = Union[jax.Array, tuple[jax.Array, jax.Array]]
"""Segment ids: one integer array that queries and keys share
(self-attention), or a (query ids, key ids) pair."""


def flash_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Optional[tuple[int, int]] = None,
    softcap: Optional[float] = None,
    alibi_slopes: Optional[jax.Array] = None,
    segment_ids: Optional[SegmentIds] = None,
    q_seq_lengths: Optional[jax.Array] = None,
    kv_seq_lengths: Optional[jax.Array] = None,
    dropout_rate: float = 0.0,
    dropout_rng: Optional[jax.Array] = None,
    return_lse: bool = False,
    deterministic: bool = False,
    implementation: Implementation = None,
) -> Union[jax.Array, tuple[jax.Array, jax.Array]]:
  """Scaled dot-product attention with FlashAttention's O(S) memory.

  Letters: B batch, Sq query length, Sk key/value length, H query heads,
  Hkv key/value heads, D query/key head dim, Dv value head dim. The layout is
  that of `jax.nn.dot_product_attention`.

  Args:
    query: (B, Sq, H, D), or (Sq, H, D) without a batch dimension.
    key: (B, Sk, Hkv, D) with H % Hkv == 0 (GQA/MQA: K/V are never repeated).
    value: (B, Sk, Hkv, Dv). query, key and value share one dtype: float32,
      bfloat16 or float16. D and Dv are at most 256.
    softmax_scale: multiplies q.k; defaults to 1 / sqrt(D).
    causal: query i attends to key j iff j <= i + offset, with the diagonal
      aligned to the bottom-right: offset = Sk - Sq (per batch row
      kv_len - q_len when sequence lengths are given).
    window_size: (left, right): query i attends to keys in
      [i + offset - left, i + offset + right]; -1 leaves a side unbounded.
      Combines with `causal` (which caps right at 0).
    softcap: if set, logits become softcap * tanh(logits / softcap), after
      the scale and before alibi. 0 or None disables it.
    alibi_slopes: (H,) or (B, H) float; adds -slope * |i + offset - j| to the
      logits. Differentiable.
    segment_ids: packed sequences: a pair (q_ids (B, Sq), kv_ids (B, Sk)) of
      integers, or one (B, Sq) array when Sq == Sk. A query attends only to
      keys with the same id.
    q_seq_lengths: (B,) integers for right-padded queries: rows at or past
      the length output 0, lse -inf, and get zero gradients.
    kv_seq_lengths: (B,) integers for right-padded keys: keys at or past the
      length are masked.
    dropout_rate: probability in [0, 1) of dropping an attention weight (the
      kept ones are scaled by 1 / (1 - rate)).
    dropout_rng: a `jax.random` key, required when dropout_rate > 0. The mask
      is a deterministic function of the key and the positions: the forward
      and the backward see the same mask.
    return_lse: also return the log-sum-exp of the logits.
    deterministic: bitwise reproducible gradients from run to run (the CUDA
      backward otherwise accumulates dQ with atomics).
    implementation: None picks the fastest path that supports the arguments
      on the current platform; "cuda" the CUDA kernels (an error if they
      cannot serve the call); "xla" the pure-JAX blockwise path, which runs
      on every backend; "reference" a plain O(Sq * Sk) implementation for
      tests and debugging.

  Under `jax.jit`, query, key and value whose sequence dimension is split
  over explicit mesh axes (e.g. `NamedSharding(mesh, P("data", "seq"))` on a
  `jax.make_mesh` mesh) run `jax_flash.ring_attention` over those axes, in
  contiguous order: K/V move between neighbours and nothing is gathered.
  This needs Sq == Sk and no sequence lengths or dropout; other calls, and
  meshes of `AxisType.Auto` axes, gather the sequence.

  A query row that sees no key at all (every key masked) outputs 0 with
  lse = -inf, and produces no NaN in any gradient. Unbatched inputs take
  unbatched mask arrays: alibi (H,), segment ids (Sq,)/(Sk,), lengths ().

  Returns:
    out (B, Sq, H, Dv) in the query's dtype; with return_lse=True the pair
    (out, lse) with lse (B, H, Sq) float32 in natural log.

  Raises:
    TypeError, ValueError: at trace time, naming the offending argument.
  """
  validation.check_implementation(implementation)
  call = normalize_arguments(
      query, key, value, softmax_scale=softmax_scale, causal=causal,
      window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
      segment_ids=segment_ids, q_seq_lengths=q_seq_lengths,
      kv_seq_lengths=kv_seq_lengths, dropout_rate=dropout_rate,
      dropout_rng=dropout_rng, deterministic=deterministic)
  # Imported here: the ring is built on this module's argument handling.
  from jax_flash.ring import sharded  # pylint: disable=import-outside-toplevel
  ring_axes = sharded.sequence_axes(call)
  if ring_axes is not None:
    out, lse = sharded.attend(call, ring_axes, implementation)
  else:
    query, key, value, config, masks = call[:5]
    attend = dispatch.select(implementation, query, key, value, config, masks)
    out, lse = attend(query, key, value, config, masks)
  if not call.batched:
    out, lse = out[0], lse[0]
  return (out, lse) if return_lse else out


def explain(query: jax.Array, key: jax.Array, value: jax.Array, *,
            implementation: Implementation = None, return_lse: bool = False,
            **options: Any) -> dispatch.Explanation:
  """Which implementation `flash_attention` would run for this call, and why.

  Takes exactly the arguments of `flash_attention` and checks them the same
  way (raising the same errors), but computes nothing. Works on every
  platform: on a machine without a GPU or without the compiled CUDA library
  it says "xla" and why, and whether the kernels would cover these arguments
  on a GPU (`cuda_covers_arguments`).

  Args:
    query, key, value: as for `flash_attention`; a `jax.ShapeDtypeStruct`
      serves as well as an array.
    implementation: as for `flash_attention`; "cuda" is explained, not
      raised, when the kernels cannot serve the call.
    return_lse: accepted so that the same keywords can be passed; it does not
      change the choice.
    **options: the other keyword arguments of `flash_attention`.

  Returns:
    An `Explanation`: `implementation` ("cuda", "xla" or "reference") and a
    one-sentence `reason`.

  Example (on a GPU):
    >>> jax_flash.explain(q, k, v, causal=True, dropout_rate=0.1,
    ...                   dropout_rng=jax.random.key(0))
    Explanation(implementation='xla', reason='the CUDA kernels do not cover
    dropout_rate > 0', cuda_covers_arguments=False)
  """
  del return_lse
  validation.check_implementation(implementation)
  call = normalize_arguments(query, key, value, **options)
  return dispatch.explain(implementation, *call[:5])


class NormalizedCall(NamedTuple):
  """`flash_attention`'s arguments after validation, batch dim included."""

  query: jax.Array
  key: jax.Array
  value: jax.Array
  config: AttentionConfig
  masks: MaskArrays
  batched: bool


def normalize_arguments(
    query: jax.Array, key: jax.Array, value: jax.Array, *,
    softmax_scale: Optional[float] = None, causal: bool = False,
    window_size: Optional[tuple[int, int]] = None,
    softcap: Optional[float] = None, alibi_slopes: Optional[jax.Array] = None,
    segment_ids: Optional[SegmentIds] = None,
    q_seq_lengths: Optional[jax.Array] = None,
    kv_seq_lengths: Optional[jax.Array] = None, dropout_rate: float = 0.0,
    dropout_rng: Optional[jax.Array] = None,
    deterministic: bool = False) -> NormalizedCall:
  """Validates `flash_attention`'s arguments (same meaning) and normalizes them.

  Returns the operands with a batch dimension, the static `AttentionConfig`
  and the batched `MaskArrays` that every implementation receives, and
  whether the call had a batch dimension. Raises TypeError/ValueError naming
  the bad argument.
  """
  validation.check_qkv(query, key, value)
  batched = query.ndim == 4
  if not batched:
    query, key, value = query[None], key[None], value[None]
  batch, sq, heads, head_dim = query.shape
  sk = key.shape[1]

  scale = validation.check_static_float("softmax_scale", softmax_scale,
                                        positive=True)
  left, right = validation.check_window(window_size)
  cap = validation.check_static_float("softcap", softcap)
  if cap is not None and cap < 0:
    raise ValueError(f"softcap must be positive (or 0/None to disable), got "
                     f"{cap}")
  rate = validation.check_dropout(dropout_rate, dropout_rng)
  config = AttentionConfig(
      softmax_scale=1.0 / math.sqrt(head_dim) if scale is None else scale,
      causal=bool(causal),
      window_left=left,
      window_right=right,
      softcap=cap or 0.0,
      dropout_rate=rate,
      deterministic=bool(deterministic))
  masks = _mask_arrays(batched, batch, sq, sk, heads, alibi_slopes,
                       segment_ids, q_seq_lengths, kv_seq_lengths,
                       dropout_rng if rate > 0 else None)
  return NormalizedCall(query, key, value, config, masks, batched)


def _mask_arrays(batched: bool, batch: int, sq: int, sk: int, heads: int,
                 alibi_slopes: Any, segment_ids: Any, q_seq_lengths: Any,
                 kv_seq_lengths: Any, dropout_rng: Any) -> MaskArrays:
  """Validated mask arrays, given a batch dimension when the call has none."""
  lead = (batch,) if batched else ()

  def batch_it(x: jax.Array) -> jax.Array:
    return x if batched else x[None]

  slopes = None
  if alibi_slopes is not None:
    shape = getattr(alibi_slopes, "shape", None)
    if shape is not None and tuple(shape) == (heads,):
      slopes = validation.check_mask_array("alibi_slopes", alibi_slopes,
                                           (heads,), integer=False)
      slopes = jnp.broadcast_to(slopes, (batch, heads))
    else:
      slopes = batch_it(validation.check_mask_array(
          "alibi_slopes", alibi_slopes, lead + (heads,), integer=False))

  q_ids = kv_ids = None
  if segment_ids is not None:
    if isinstance(segment_ids, (tuple, list)):
      if len(segment_ids) != 2:
        raise ValueError("segment_ids must be one array or a pair (q_ids, "
                         f"kv_ids), got a sequence of {len(segment_ids)}")
      q_ids, kv_ids = segment_ids
    else:
      if sq != sk:
        raise ValueError(
            "a single segment_ids array needs Sq == Sk; pass a pair "
            f"(q_ids, kv_ids) for Sq={sq}, Sk={sk}, got segment_ids of "
            f"shape {jnp.shape(segment_ids)}")
      q_ids = kv_ids = segment_ids
    q_ids = batch_it(validation.check_mask_array(
        "segment_ids (query ids)", q_ids, lead + (sq,), integer=True))
    kv_ids = batch_it(validation.check_mask_array(
        "segment_ids (key ids)", kv_ids, lead + (sk,), integer=True))

  def lengths(name: str, x: Any) -> Optional[jax.Array]:
    if x is None:
      return None
    return batch_it(validation.check_mask_array(name, x, lead, integer=True))

  return MaskArrays(
      alibi_slopes=slopes,
      q_segment_ids=q_ids,
      kv_segment_ids=kv_ids,
      q_lengths=lengths("q_seq_lengths", q_seq_lengths),
      kv_lengths=lengths("kv_seq_lengths", kv_seq_lengths),
      dropout_seed=(None if dropout_rng is None else
                    validation.dropout_seed(dropout_rng)))
