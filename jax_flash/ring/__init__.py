"""Context parallelism: attention over a sequence split across devices.

`ring_attention` runs inside `jax.shard_map`; `load_balance` and
`unload_balance` reorder a sequence so that causal work is the same on every
shard.
"""

from jax_flash.ring.attention import ring_attention
from jax_flash.ring.reorder import load_balance, unload_balance

__all__ = ["ring_attention", "load_balance", "unload_balance"]
