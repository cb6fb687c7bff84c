"""Attention against a key/value cache, for decoding.

`flash_attention_with_kv_cache` appends new tokens to a contiguous or paged
cache and attends to it; modules, one job each: `validation` (argument
checks), `append` (in-place writes), `paged` (the pure-JAX view of a paged
cache), `dispatch` (which implementation serves a call) and
`cache_attention` (the entry point).
"""

from jax_flash.decode.cache_attention import (KVCacheAttention,
                                              flash_attention_with_kv_cache)

__all__ = ["flash_attention_with_kv_cache", "KVCacheAttention"]
