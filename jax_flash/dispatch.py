"""Choosing the implementation that serves one call."""

from __future__ import annotations

import dataclasses
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


@dataclasses.dataclass(frozen=True)
class Explanation:
  """Which implementation serves an attention call, and why.

  Attributes:
    implementation: "cuda" (the CUDA kernels), "xla" (the pure-JAX blockwise
      path) or "reference".
    reason: one sentence saying why this implementation and not the CUDA
      kernels (or, for "cuda", that they cover the call).
    cuda_covers_arguments: whether the CUDA kernels cover these arguments,
      whether or not they can run here: on a CPU this says if the same call
      would run the kernels on a GPU with this build.
  """

  implementation: str
  reason: str
  cuda_covers_arguments: bool


def explain(implementation: Optional[str], q: jax.Array, k: jax.Array,
            v: jax.Array, config: AttentionConfig,
            masks: MaskArrays) -> Explanation:
  """The implementation `select` picks for these (validated, batched)
  arguments, with the reason."""
  unsupported = cuda.unsupported_reason(q, k, v, config, masks)
  covers = unsupported is None
  if implementation in ("reference", "xla"):
    return Explanation(implementation,
                       f"implementation={implementation!r} was asked for",
                       covers)
  unavailable = cuda_unavailable_reason()
  if unavailable is None and unsupported is None:
    return Explanation("cuda", "the CUDA kernels cover these arguments on "
                       "this GPU", True)
  if unavailable is None:
    reason = f"the CUDA kernels do not cover {unsupported}"
  elif unsupported is None:
    reason = unavailable
  else:
    reason = (f"{unavailable}; the kernels would not cover {unsupported} "
              "either")
  return Explanation("xla", reason, covers)


def select(implementation: Optional[str], q: jax.Array, k: jax.Array,
           v: jax.Array, config: AttentionConfig,
           masks: MaskArrays) -> Attend:
  """The function that computes (out, lse) for these arguments.

  `None` prefers the CUDA kernels on an NVIDIA GPU and falls back to the
  blockwise path, logging once per reason when the kernels were available
  but these arguments are not covered. An explicit "cuda" raises instead.
  """
  choice = explain(implementation, q, k, v, config, masks)
  if choice.implementation == "cuda":
    return cuda.attention
  if implementation == "cuda":
    raise ValueError("implementation='cuda' cannot serve this call: "
                     f"{choice.reason}")
  fell_back = implementation is None and cuda_unavailable_reason() is None
  if fell_back and choice.reason not in _logged_fallbacks:
    _logged_fallbacks.add(choice.reason)
    logger.warning("jax_flash: using the blockwise path because %s",
                   choice.reason)
  return {"reference": reference_attention,
          "xla": blockwise_attention}[choice.implementation]
