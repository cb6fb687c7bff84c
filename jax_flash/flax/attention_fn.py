"""A drop-in replacement for Flax's `dot_product_attention`."""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from jax_flash.flax.attend import attend


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    bias: Optional[jax.Array] = None,
    mask: Optional[jax.Array] = None,
    broadcast_dropout: bool = True,
    dropout_rng: Optional[jax.Array] = None,
    dropout_rate: float = 0.0,
    deterministic: bool = False,
    dtype: Any = None,
    precision: Any = None,
    module: Any = None,
    *,
    promote_dtype: Optional[Callable[..., Any]] = None,
    is_causal: bool = False,
    force_fp32_for_softmax: bool = False,
    einsum_dot_general: Optional[Callable[..., Any]] = None,
    qk_attn_weights_einsum: Optional[Callable[..., Any]] = None,
    attn_weights_value_einsum: Optional[Callable[..., Any]] = None,
    implementation: Optional[str] = None,
    **newer_flax_keywords: Any,
) -> jax.Array:
  """`flax.linen` / `flax.nnx` `dot_product_attention`, computed by jax_flash.

  Pass it as `attention_fn=` to `flax.linen.MultiHeadDotProductAttention` or
  `flax.nnx.MultiHeadAttention`; parameters and checkpoints are unchanged.
  The arguments up to `module` keep Flax's positions; the rest, whose order
  differs between Linen and NNX, are keyword-only.

  Shapes: query (batch..., Sq, H, D), key (batch..., Sk, Hkv, D), value
  (batch..., Sk, Hkv, Dv), any number of batch dimensions (or none), H a
  multiple of Hkv (GQA). Returns (batch..., Sq, H, Dv).

  The fast path: with no `mask` and no `bias`, the call goes to
  `jax_flash.flash_attention` (the CUDA kernels on a GPU, the blockwise path
  elsewhere) and never builds an Sq x Sk array. Causal attention stays on it
  with `is_causal=True` (NNX: `layer(x, is_causal=True)`; Linen:
  `attention_fn=functools.partial(dot_product_attention, is_causal=True)`)
  instead of `mask=make_causal_mask(...)`. Padding and packed sequences stay
  on it with `jax_flash.flax.linen.FlashMultiHeadAttention` or
  `jax_flash.flax.nnx.FlashMultiHeadAttention`, whose calls take
  `segment_ids`, `q_seq_lengths`, `kv_seq_lengths`, `causal` and
  `window_size` instead of a dense mask.

  The dense path: any `mask` or `bias` gives exact results through
  query-chunked attention that holds one (batch, H, 128, Sk) tile at a time
  and recomputes it in the backward; it costs the memory of the mask and
  bias themselves and runs at roughly the speed of unfused attention.

  Args:
    query: queries, see the shapes above.
    key: keys.
    value: values.
    bias: float, broadcastable to (batch..., H, Sq, Sk), added to the scaled
      logits; differentiable.
    mask: boolean, broadcastable to (batch..., H, Sq, Sk); False hides a key.
    broadcast_dropout: accepted for compatibility. Flax shares one dropout
      mask across batch and heads when True; jax_flash always draws the mask
      per batch row and head (the same keep probability).
    dropout_rng: `jax.random` key, needed when dropout is applied.
    dropout_rate: probability of dropping an attention weight.
    deterministic: True disables dropout (Flax's meaning; unrelated to
      `flash_attention(deterministic=...)`).
    dtype: computation dtype; default: the promoted dtype of q, k, v.
    precision: accepted for compatibility and not used: matmuls take the
      input dtype and accumulate in float32.
    module: Flax sets it to ask for the attention weights to be sown
      (`sow_weights=True`); jax_flash never forms them, so this raises.
    promote_dtype: NNX's dtype promotion function, called as
      `promote_dtype((query, key, value), dtype=dtype)`.
    is_causal: causal mask as Flax defines it: query i sees keys j <= i
      (top-left aligned; the same as bottom-right when Sq == Sk).
    force_fp32_for_softmax: accepted; softmax statistics are always float32.
    einsum_dot_general: must be None (custom matmuls cannot be honoured).
    qk_attn_weights_einsum: must be None.
    attn_weights_value_einsum: must be None.
    implementation: `jax_flash.flash_attention`'s `implementation` for the
      fast path (None picks the fastest).
    **newer_flax_keywords: keywords a later Flax release may pass (NNX
      passes every keyword it knows); accepted while None or False, their
      "off" value, an error otherwise, so that no option is silently lost.

  A query row whose keys are all masked outputs zeros (Flax's softmax would
  average all values instead).

  Raises:
    ValueError: for `module` (sown weights), a custom einsum or an unknown
      option that is switched on, and for shapes that do not fit.
  """
  if module is not None:
    raise ValueError(
        "jax_flash.flax.dot_product_attention cannot sow attention weights "
        f"(got module={type(module).__name__}, which Flax passes for "
        "sow_weights=True): it never materializes the (batch, H, Sq, Sk) "
        "weights. Call the "
        "layer with sow_weights=False, or use Flax's own "
        "dot_product_attention for the calls that need the weights.")
  unknown = sorted(name for name, value in newer_flax_keywords.items()
                   if value is not None and value is not False)
  if unknown:
    raise ValueError(
        f"jax_flash.flax.dot_product_attention does not support "
        f"{', '.join(unknown)}")
  custom = [name for name, fn in (
      ("einsum_dot_general", einsum_dot_general),
      ("qk_attn_weights_einsum", qk_attn_weights_einsum),
      ("attn_weights_value_einsum", attn_weights_value_einsum))
            if fn is not None]
  if custom:
    raise ValueError(
        f"jax_flash.flax.dot_product_attention cannot use a custom "
        f"{', '.join(custom)}: its kernels do their own matmuls. Leave the "
        "einsum classes of the attention layer unset.")
  if promote_dtype is not None:
    query, key, value = promote_dtype((query, key, value), dtype=dtype)
  else:
    if dtype is None:
      dtype = jnp.result_type(query, key, value)
    query, key, value = (jnp.asarray(x, dtype) for x in (query, key, value))

  positions = {}
  if is_causal:
    positions = top_left_causal(query.shape[-3], key.shape[-3],
                                query.shape[:-3])
  rate = 0.0 if deterministic else dropout_rate
  return attend(query, key, value, mask=mask, bias=bias,
                dropout_rate=rate, dropout_rng=dropout_rng if rate else None,
                implementation=implementation, **positions)


def top_left_causal(sq: int, sk: int, batch_shape: tuple[int, ...]
                    ) -> dict[str, Any]:
  """`attend` arguments for Flax's causal mask: query i sees keys j <= i.

  jax_flash aligns causal masks bottom-right (j <= i + Sk - Sq). Three cases
  express the top-left mask with it exactly:
  * Sq == Sk: the two alignments agree;
  * Sk > Sq: keys j >= Sq are hidden anyway, so cutting the keys to length
    Sq makes the offset 0;
  * Sk < Sq: a right window of Sq - Sk cancels the offset Sk - Sq.
  """
  if sq == sk:
    return {"causal": True}
  if sk > sq:
    return {"causal": True,
            "kv_seq_lengths": jnp.full(batch_shape, sq, jnp.int32)}
  return {"window_size": (-1, sq - sk)}
