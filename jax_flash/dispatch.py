"""Choosing the implementation that serves one call."""

from __future__ import annotations

import logging
from typing import Callable, Optional

import jax

from jax_flash import cuda
from jax_flash.blockwise import blockwise_attention
from jax_flash.config import AttentionConfig, MaskArrays
from jax_flash.reference import reference_attention

Attend = Callable[[jax.Array, jax.Array, jax.Array, AttentionConfig,
                   MaskArrays], tuple[jax.Array, jax.Array]]

logger = logging.getLogger("jax_flash")
_logged_fallbacks: set[str] = set()


def cuda_unavailable_reason() -> Optional[str]:
  """Why the CUDA kernels cannot run here at all, or None if they can."""
  return cuda.unavailable_reason()


def select(implementation: Optional[str], q: jax.Array, k: jax.Array,
           v: jax.Array, config: AttentionConfig,
           masks: MaskArrays) -> Attend:
  """The function that computes (out, lse) for these arguments.

  `None` prefers the CUDA kernels on an NVIDIA GPU and falls back to the
  blockwise path, logging once per reason when the kernels were available
  but these arguments are not covered. An explicit "cuda" raises instead.
  """
  if implementation == "reference":
    return reference_attention
  if implementation == "xla":
    return blockwise_attention
  unavailable = cuda_unavailable_reason()
  unsupported = None
  if unavailable is None:
    unsupported = cuda.unsupported_reason(q, k, v, config, masks)
    if unsupported is None:
      return cuda.attention
  if implementation == "cuda":
    raise ValueError("implementation='cuda' cannot serve this call: "
                     f"{unavailable or unsupported}")
  if unsupported is not None and unsupported not in _logged_fallbacks:
    _logged_fallbacks.add(unsupported)
    logger.warning("jax_flash: using the blockwise path because %s",
                   unsupported)
  return blockwise_attention
