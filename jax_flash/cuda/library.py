"""Finding, loading and registering the compiled CUDA library.

The library (`jax_flash/_lib/libjax_flash_cuda.so`, built by
`build/build_cuda.py`) exports plain C symbols, described in
docs/ffi_contract.md. It sits at the same place relative to this file in an
installed package and in a source checkout, so one lookup serves both; the
environment variable JAX_FLASH_CUDA_LIBRARY names another file instead.

Nothing here touches a GPU or registers anything at import time: a CPU-only
machine imports this module, finds no library, and reports why.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import os
import pathlib
from typing import Optional, Union

import jax

LIBRARY_ENV_VAR = "JAX_FLASH_CUDA_LIBRARY"
FORWARD_TARGET = "jax_flash_fwd"
BACKWARD_TARGET = "jax_flash_bwd"
CONTRACT_HEAD_DIMS = (32, 64, 96, 128, 160, 192, 224, 256)
"""Head dims the kernels can be instantiated for (docs/ffi_contract.md)."""

_HANDLER_SYMBOLS = {FORWARD_TARGET: "JaxFlashFwd",
                    BACKWARD_TARGET: "JaxFlashBwd"}


class LibraryUnavailableError(RuntimeError):
  """Raised when something needs the CUDA library and it is not loaded."""


@dataclasses.dataclass(frozen=True)
class BuildInfo:
  """What one build of the library contains.

  Attributes:
    kernels: (direction, dtype, head_dim) triples, direction "fwd" or "bwd",
      dtype "bf16" or "fp16" (the tags of build/generate_kernels.py).
    archs: compute capabilities compiled for, as 10 * major + minor.
  """

  kernels: frozenset[tuple[str, str, int]]
  archs: tuple[int, ...]

  @classmethod
  def parse(cls, text: str) -> BuildInfo:
    """Reads `jax_flash_build_info()`: "fwd:bf16:128;bwd:bf16:128|archs=90"."""
    items, _, arch_part = text.partition("|")
    kernels = set()
    for item in filter(None, items.split(";")):
      direction, dtype, head_dim = item.split(":")
      kernels.add((direction, dtype, int(head_dim)))
    key, _, values = arch_part.partition("=")
    if key != "archs":
      raise ValueError(f"unreadable jax_flash_build_info: {text!r}")
    archs = tuple(int(a) for a in values.split(",") if a)
    return cls(frozenset(kernels), archs)

  def head_dims(self, dtype: str) -> tuple[int, ...]:
    """Head dims with both directions compiled for `dtype`, ascending."""
    return tuple(sorted(d for direction, t, d in self.kernels
                        if direction == "fwd" and t == dtype
                        and ("bwd", t, d) in self.kernels))

  def runs_on(self, capability: int) -> bool:
    """Whether code built here runs on a device of this capability.

    Machine code for sm_XY runs on devices of the same major version and a
    minor version >= Y; the PTX of the newest arch, which every build embeds
    (build/build_cuda.py), is compiled by the driver for any later device.
    """
    return any(a // 10 == capability // 10 and a <= capability
               for a in self.archs) or capability >= max(self.archs)


@dataclasses.dataclass(frozen=True)
class Library:
  """The loaded shared library."""

  path: pathlib.Path
  handle: ctypes.CDLL
  build_info: BuildInfo


def library_path() -> pathlib.Path:
  """Where the library is looked for."""
  override = os.environ.get(LIBRARY_ENV_VAR)
  if override:
    return pathlib.Path(override)
  return (pathlib.Path(__file__).resolve().parent.parent / "_lib" /
          "libjax_flash_cuda.so")


@functools.cache
def _load() -> Union[Library, str]:
  """The library, or a sentence saying why it could not be loaded."""
  path = library_path()
  if not path.is_file():
    return f"the CUDA kernels are not built ({path} does not exist)"
  try:
    handle = ctypes.CDLL(str(path), mode=ctypes.RTLD_LOCAL)
    handle.jax_flash_build_info.restype = ctypes.c_char_p
    handle.jax_flash_build_info.argtypes = []
    handle.jax_flash_bwd_workspace_bytes.restype = ctypes.c_int64
    handle.jax_flash_bwd_workspace_bytes.argtypes = (
        [ctypes.c_int64] * 7 + [ctypes.c_int32])
    info = BuildInfo.parse(handle.jax_flash_build_info().decode())
  except (OSError, AttributeError, ValueError) as e:
    return f"{path} could not be loaded: {e}"
  return Library(path, handle, info)


def load_error() -> Optional[str]:
  """None when the library is loaded, else why it is not."""
  loaded = _load()
  return loaded if isinstance(loaded, str) else None


def load() -> Library:
  """The loaded library; raises LibraryUnavailableError if there is none."""
  loaded = _load()
  if isinstance(loaded, str):
    raise LibraryUnavailableError(loaded)
  return loaded


def kernel_head_dim(dtype: str, needed: int) -> Optional[int]:
  """The smallest compiled head dim >= needed for `dtype`, or None.

  Without the library (a CPU-only machine inspecting the lowering), every
  size of the contract counts as compiled.
  """
  loaded = _load()
  sizes = (CONTRACT_HEAD_DIMS if isinstance(loaded, str)
           else loaded.build_info.head_dims(dtype))
  return next((d for d in sizes if d >= needed), None)


@functools.cache
def register_targets() -> None:
  """Registers both FFI handlers with XLA for the CUDA platform, once.

  Call only when the default backend is a CUDA GPU: jaxlib builds without
  CUDA have no such platform to register with.
  """
  handle = load().handle
  for target, symbol in _HANDLER_SYMBOLS.items():
    jax.ffi.register_ffi_target(
        target, jax.ffi.pycapsule(getattr(handle, symbol)), platform="CUDA")


def bwd_workspace_bytes(batch: int, sq: int, sk: int, heads: int,
                        kv_heads: int, head_dim: int, value_dim: int,
                        deterministic: bool) -> int:
  """Bytes of scratch the backward kernel needs for these (local) shapes."""
  size = load().handle.jax_flash_bwd_workspace_bytes(
      batch, sq, sk, heads, kv_heads, head_dim, value_dim, int(deterministic))
  if size < 0:
    raise ValueError(f"jax_flash_bwd_workspace_bytes returned {size}")
  return size
