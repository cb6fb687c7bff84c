"""jax_flash's CUDA kernels as a JAX operation.

Importing this package never needs a GPU or the compiled library; the
dispatcher asks `unavailable_reason()` and `unsupported_reason(...)` before
calling `attention`. Layers, one module each: `instantiations` (the head
dims and archs kernels can be built for, shared with the build), `library`
(find, load and register the shared library; the kernel arch of each call),
`lowering` (the FFI custom calls and their operand lists), `partitioning`
(sharding rules), `primitives` (abstract evaluation, batching, lowering
registration) and `ops` (padding and the custom VJP).

Letters: B batch, Sq/Sk query/key length, H query heads, Hkv KV heads, D
head dim of q and k, Dv head dim of v.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from jax_flash.config import AttentionConfig, MaskArrays
from jax_flash.cuda import library
from jax_flash.cuda.library import DTYPE_NAMES
from jax_flash.cuda.ops import (attention, attention_backward,
                                attention_forward, attention_gradients,
                                kernel_head_dim)

__all__ = ["unavailable_reason", "unsupported_reason", "attention",
           "attention_forward", "attention_backward", "attention_gradients"]


@functools.cache
def unavailable_reason() -> Optional[str]:
  """None when the kernels can run here, else a sentence saying why not.

  They can run when the library is loaded, its handlers are registered, the
  default JAX backend is a CUDA GPU and the library has code for it. The
  handlers are registered here, on the first call that finds all the rest.
  """
  error = library.load_error()
  if error is not None:
    return error
  backend = jax.default_backend()
  if backend != "gpu":
    return f"the default JAX backend is {backend}, not a CUDA GPU"
  device = jax.devices()[0]
  if "cuda" not in device.client.platform_version.lower():
    return f"the GPU runs {device.client.platform_version}, not CUDA"
  capability = library.device_capability(device)
  info = library.load().build_info
  if capability is None or not info.runs_on(capability):
    built = ", ".join(f"sm_{a}" for a in info.archs)
    return (f"{device.device_kind} (sm_{capability}) is not among the "
            f"architectures built: {built}")
  if library.forced_arch() == 90 and capability // 10 != 9:
    return (f"{library.FORCE_ARCH_ENV_VAR}=sm90, but the sm90 kernels need "
            f"a GPU of compute capability 9.x, not sm_{capability}")
  try:
    library.register_targets()
  except Exception as e:  # pylint: disable=broad-except
    return f"registering the CUDA handlers failed: {e}"
  return None


def unsupported_reason(q: jax.Array, k: jax.Array, v: jax.Array,
                       config: AttentionConfig,
                       masks: MaskArrays) -> Optional[str]:
  """None when the kernels cover these arguments, else what they lack.

  Arguments are the validated, batched ones `flash_attention` passes on.
  """
  if config.dropout_rate > 0:
    return "dropout_rate > 0"
  dtype = jnp.dtype(q.dtype)
  if dtype not in DTYPE_NAMES:
    return f"{dtype.name} inputs"
  if jnp.dtype(k.dtype) != dtype or jnp.dtype(v.dtype) != dtype:
    return "q, k and v of different dtypes"
  if 0 in q.shape[:2] or k.shape[1] == 0:
    return "an empty batch or sequence"
  needed = max(q.shape[3], v.shape[3])
  if kernel_head_dim(dtype, needed) is None:
    return (f"head dim {needed} not compiled in this build "
            f"({DTYPE_NAMES[dtype]})")
  return None
