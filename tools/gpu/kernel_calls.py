"""What the kernel check scripts share: the library, loaded and registered
by jax_flash's own loader (jax_flash.cuda.library), the two custom calls as
jax_flash.cuda.lowering emits them (no padding, batching or custom VJP, so a
failure points at csrc/), and the error measure.
"""

from __future__ import annotations

import os
import pathlib

import jax
import jax.numpy as jnp

from jax_flash.config import AttentionConfig, MaskArrays
from jax_flash.cuda import library, lowering


def load(path: pathlib.Path) -> library.Library:
  """Loads the library at `path` and registers its handlers with XLA."""
  os.environ[library.LIBRARY_ENV_VAR] = str(path)
  loaded = library.load()
  library.register_targets()
  return loaded


def forward(q: jax.Array, k: jax.Array, v: jax.Array, config: AttentionConfig,
            masks: MaskArrays) -> tuple[jax.Array, jax.Array]:
  """`jax_flash_fwd`: (out, lse)."""
  arrays, names = lowering.given_masks(masks, q.shape[0])
  return lowering.forward_call(q, k, v, *arrays, config=config,
                               mask_names=names)


def backward(q: jax.Array, k: jax.Array, v: jax.Array, out: jax.Array,
             dout: jax.Array, lse: jax.Array, config: AttentionConfig,
             masks: MaskArrays) -> tuple[jax.Array, ...]:
  """`jax_flash_bwd`: (dq, dk, dv), and dalibi with alibi slopes."""
  arrays, names = lowering.given_masks(masks, q.shape[0])
  return lowering.backward_call(q, k, v, out, dout, lse, *arrays,
                                config=config, mask_names=names)


def max_abs_err(a: jax.Array, b: jax.Array) -> float:
  """max |a - b|, with equal infinities counting 0 and a NaN infinite."""
  a = jnp.asarray(a, jnp.float32)
  b = jnp.asarray(b, jnp.float32)
  diff = jnp.where(a == b, 0.0, jnp.abs(a - b))
  return float(jnp.max(jnp.where(jnp.isnan(diff), jnp.inf, diff),
                       initial=0.0))
