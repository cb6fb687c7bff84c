"""A plain O(Sq * Sk) attention: the ground truth for tests and debugging.

It materializes the whole score matrix, so use it only on small inputs.
Gradients come from JAX's autodiff of this code.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_flash import layout, masking
from jax_flash.config import AttentionConfig, MaskArrays


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                        config: AttentionConfig, masks: MaskArrays, *,
                        upcast: bool = True) -> tuple[jax.Array, jax.Array]:
  """Attention by the definition, with every mask of `jax_flash.masking`.

  Args:
    q: (B, Sq, H, D) queries.
    k: (B, Sk, Hkv, D) keys.
    v: (B, Sk, Hkv, Dv) values.
    config: static options.
    masks: batched mask arrays.
    upcast: compute the matmuls in float32 (the accurate reference). With
      False, the matmul operands and the probabilities stay in the input
      dtype, softmax statistics in float32: the error of this mode is the
      yardstick the kernels are held to.

  Returns:
    (out (B, Sq, H, Dv) in q's dtype, lse (B, H, Sq) float32).
  """
  dtype = q.dtype
  batch, sq, heads, _ = q.shape
  sk, kv_heads = k.shape[1], k.shape[2]
  compute = jnp.float32 if upcast else dtype
  qg = layout.group_queries(q.astype(compute), kv_heads)
  kh = layout.heads_major(k.astype(compute))
  vh = layout.heads_major(v.astype(compute))
  scores = jnp.einsum("bhgqd,bhkd->bhgqk", qg, kh,
                      preferred_element_type=jnp.float32)
  q_pos = jnp.arange(sq, dtype=jnp.int32)
  k_pos = jnp.arange(sk, dtype=jnp.int32)
  logits, visible = masking.modify_and_mask(scores, config, masks, q_pos,
                                            k_pos, sq, sk)
  logits = jnp.where(visible, logits, -jnp.inf)
  m = layout.finite_or_zero(jax.lax.stop_gradient(jnp.max(logits, axis=-1)))
  p = jnp.exp(logits - m[..., None])
  inv_l, lse = layout.safe_log_normalizer(m, jnp.sum(p, axis=-1))
  if config.dropout_rate > 0:
    keep = masking.dropout_keep(masks.dropout_seed, config.dropout_rate,
                                heads, scores.shape[:3], q_pos, k_pos)
    p = jnp.where(keep, p / (1.0 - config.dropout_rate), 0.0)
  p = p * inv_l[..., None]
  out = jnp.einsum("bhgqk,bhkd->bhgqd", p.astype(compute), vh,
                   preferred_element_type=jnp.float32)
  out = layout.ungroup_queries(out).astype(dtype)
  return out, lse.reshape(batch, heads, sq)
