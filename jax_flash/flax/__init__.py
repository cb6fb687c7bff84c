"""Flax integration: a drop-in `attention_fn` and multi-head attention layers.

* `dot_product_attention`: pass it as `attention_fn=` to
  `flax.linen.MultiHeadDotProductAttention` or `flax.nnx.MultiHeadAttention`.
* `jax_flash.flax.linen.FlashMultiHeadAttention` and
  `jax_flash.flax.nnx.FlashMultiHeadAttention`: Flax's multi-head attention
  with the same parameters, plus GQA (`num_kv_heads`) and call-time `causal`,
  `window_size`, `segment_ids` and sequence lengths that keep attention on
  the fast path.
"""

try:
  import flax  # noqa: F401  (imported first to name the missing extra)
except ImportError as e:
  raise ImportError(
      'jax_flash.flax needs Flax, which is not installed: pip install '
      '"jax_flash[flax]"') from e

from jax_flash.flax import linen, nnx  # noqa: E402
from jax_flash.flax.attention_fn import dot_product_attention

__all__ = ["dot_product_attention", "linen", "nnx"]
