"""jax_flash: FlashAttention for JAX.

`flash_attention` is the main entry point; it runs CUDA kernels on NVIDIA
GPUs and a pure-JAX blockwise implementation with the same O(S) memory
everywhere else. `explain` says which of them a call would run, and why.
`flash_attention_with_kv_cache` serves decoding against a contiguous or
paged key/value cache.
"""

from jax_flash.attention import explain, flash_attention
from jax_flash.config import MAX_HEAD_DIM, AttentionConfig, MaskArrays
from jax_flash.decode import KVCacheAttention, flash_attention_with_kv_cache
from jax_flash.dispatch import Explanation
from jax_flash.first_order import HigherOrderDerivativeError
from jax_flash.merge import merge_attention_states
from jax_flash.ring import load_balance, ring_attention, unload_balance

__version__ = "0.1.0"

__all__ = [
    "flash_attention",
    "merge_attention_states",
    "flash_attention_with_kv_cache",
    "KVCacheAttention",
    "explain",
    "Explanation",
    "ring_attention",
    "load_balance",
    "unload_balance",
    "AttentionConfig",
    "MaskArrays",
    "MAX_HEAD_DIM",
    "HigherOrderDerivativeError",
    "__version__",
]
