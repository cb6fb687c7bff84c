"""Finding, loading and registering the compiled CUDA library.

The library (`jax_flash/_lib/libjax_flash_cuda.so`, built by
`build/build_cuda.py`) exports plain C symbols, described in
docs/ffi_contract.md. It sits at the same place relative to this file in an
installed package and in a source checkout, so one lookup serves both; the
environment variable JAX_FLASH_CUDA_LIBRARY names another file instead.

It also chooses the arch of the kernels that run a call (`kernel_arch`): the
sm90 kernels on a GPU of compute capability 9.x where the build has one for
the call (for the directions in DEFAULT_SM90_DIRECTIONS), else the sm80
kernels; JAX_FLASH_FORCE_ARCH=sm80 counts only the sm80 kernels as built,
JAX_FLASH_FORCE_ARCH=sm90 runs every sm90 kernel built (sm80 for the rest).

Nothing here touches a GPU or registers anything at import time: a CPU-only
machine imports this module, finds no library, and reports why.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import logging
import os
import pathlib
from typing import Optional, Union

import jax
import jax.numpy as jnp

from jax_flash.cuda import instantiations

LIBRARY_ENV_VAR = "JAX_FLASH_CUDA_LIBRARY"
FORCE_ARCH_ENV_VAR = "JAX_FLASH_FORCE_ARCH"
FORWARD_TARGET = "jax_flash_fwd"
BACKWARD_TARGET = "jax_flash_bwd"
DECODE_TARGET = "jax_flash_decode"
DTYPE_NAMES = {jnp.dtype(jnp.bfloat16): "bf16", jnp.dtype(jnp.float16): "fp16"}
"""Input dtypes the kernels take, with their names in the build info."""

DEFAULT_SM90_DIRECTIONS: frozenset[str] = frozenset({"fwd", "bwd"})
"""Directions whose sm90 kernels a 9.x GPU runs without being asked: those
that have passed the GPU suite and compute-sanitizer on an sm90 GPU. A
direction's sm90 kernel outside this set (one still being brought up) runs
only under JAX_FLASH_FORCE_ARCH=sm90."""

logger = logging.getLogger("jax_flash")
_logged_arch_choices: set[str] = set()

_HANDLER_SYMBOLS = {FORWARD_TARGET: "JaxFlashFwd",
                    BACKWARD_TARGET: "JaxFlashBwd",
                    DECODE_TARGET: "JaxFlashDecode"}


class LibraryUnavailableError(RuntimeError):
  """Raised when something needs the CUDA library and it is not loaded."""


@dataclasses.dataclass(frozen=True)
class BuildInfo:
  """What one build of the library contains.

  Attributes:
    kernels: (arch, direction, dtype, head_dim): arch the kernel arch, 80 or
      90 (csrc/sm80/, csrc/sm90/), direction "fwd" or "bwd", dtype "bf16" or
      "fp16" (the tags of build/generate_kernels.py).
    archs: compute capabilities the sm80 kernels were compiled for, as
      10 * major + minor (JAX_FLASH_CUDA_ARCHS).
  """

  kernels: frozenset[tuple[int, str, str, int]]
  archs: tuple[int, ...]

  @classmethod
  def parse(cls, text: str) -> BuildInfo:
    """Reads `jax_flash_build_info()`:
    "sm80:fwd:bf16:128;sm80:bwd:bf16:128|archs=80,90"."""
    items, _, arch_part = text.partition("|")
    kernels = set()
    for item in filter(None, items.split(";")):
      parts = item.split(":")
      if len(parts) != 4 or not parts[0].startswith("sm"):
        raise ValueError(f"unreadable jax_flash_build_info item {item!r} "
                         "(a library built before kernel archs: rebuild it)")
      kernels.add((int(parts[0][2:]), parts[1], parts[2], int(parts[3])))
    key, _, values = arch_part.partition("=")
    if key != "archs":
      raise ValueError(f"unreadable jax_flash_build_info: {text!r}")
    archs = tuple(int(a) for a in values.split(",") if a)
    return cls(frozenset(kernels), archs)

  def only_arch(self, arch: int) -> BuildInfo:
    """This build with the kernels of one kernel arch alone."""
    return BuildInfo(frozenset(k for k in self.kernels if k[0] == arch),
                     self.archs)

  def kernel_archs(self, direction: str, dtype: str,
                   head_dim: int) -> tuple[int, ...]:
    """The kernel archs built for (direction, dtype, head_dim), ascending."""
    return tuple(sorted(a for a, d, t, h in self.kernels
                        if (d, t, h) == (direction, dtype, head_dim)))

  def head_dims(self, dtype: str) -> tuple[int, ...]:
    """Head dims with both directions compiled for `dtype`, ascending."""
    built = {(d, t, h) for _, d, t, h in self.kernels}
    return tuple(sorted(h for d, t, h in built
                        if d == "fwd" and t == dtype and ("bwd", t, h) in built))

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
    handle.jax_flash_fwd_workspace_bytes.restype = ctypes.c_int64
    handle.jax_flash_fwd_workspace_bytes.argtypes = []
    handle.jax_flash_bwd_workspace_bytes.restype = ctypes.c_int64
    handle.jax_flash_bwd_workspace_bytes.argtypes = (
        [ctypes.c_int64] * 7 + [ctypes.c_int32])
    handle.jax_flash_decode_workspace_bytes.restype = ctypes.c_int64
    handle.jax_flash_decode_workspace_bytes.argtypes = [ctypes.c_int64] * 6
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


def device_capability(device: jax.Device) -> Optional[int]:
  """10 * major + minor of a CUDA device, or None if it does not say."""
  text = str(getattr(device, "compute_capability", ""))
  major, _, minor = text.partition(".")
  if not (major.isdigit() and minor.isdigit()):
    return None
  return int(major) * 10 + int(minor)


def forced_arch() -> Optional[int]:
  """The kernel arch JAX_FLASH_FORCE_ARCH names ("sm80", "sm90"), or None."""
  value = os.environ.get(FORCE_ARCH_ENV_VAR, "").strip()
  if not value:
    return None
  names = {f"sm{a}": a for a in instantiations.KERNEL_ARCHS}
  if value not in names:
    raise ValueError(f"{FORCE_ARCH_ENV_VAR}={value!r}: choose from "
                     f"{sorted(names)}")
  return names[value]


def _build_info() -> Optional[BuildInfo]:
  """The loaded build (its sm80 kernels alone under
  JAX_FLASH_FORCE_ARCH=sm80); None without a library."""
  loaded = _load()
  if isinstance(loaded, str):
    return None
  info = loaded.build_info
  return info.only_arch(80) if forced_arch() == 80 else info


def kernel_head_dim(dtype: str, needed: int) -> Optional[int]:
  """The smallest compiled head dim >= needed for `dtype`, or None.

  Without the library (a CPU-only machine inspecting the lowering), every
  head dim of jax_flash.cuda.instantiations counts as compiled.
  """
  info = _build_info()
  sizes = instantiations.HEAD_DIMS if info is None else info.head_dims(dtype)
  return next((d for d in sizes if d >= needed), None)


def kernel_arch(direction: str, dtype: str, head_dim: int) -> int:
  """The arch of the kernels that run (direction, dtype, head_dim) here.

  sm90 on a default device of compute capability 9.x when the build has an
  sm90 kernel for the call and the direction is in DEFAULT_SM90_DIRECTIONS
  or JAX_FLASH_FORCE_ARCH=sm90 asks for it, else sm80; taking sm80 on such a
  device while the build has sm90 kernels is logged once per reason.
  Without the library (lowering on a CPU-only machine): the forced arch,
  else 80.
  """
  info = _build_info()
  if info is None:
    return forced_arch() or 80
  built = info.kernel_archs(direction, dtype, head_dim)
  capability = None
  if jax.default_backend() == "gpu":
    capability = device_capability(jax.devices()[0])
  on_sm90 = capability is not None and capability // 10 == 9
  wanted = direction in DEFAULT_SM90_DIRECTIONS or forced_arch() == 90
  if on_sm90 and 90 in built and wanted:
    return 90
  if 80 not in built:
    raise ValueError(f"no {direction} kernel for {dtype} at head dim "
                     f"{head_dim} runs on sm_{capability} in this build")
  if on_sm90 and any(k[0] == 90 for k in info.kernels):
    reason = (f"no sm90 {direction} kernel is built for {dtype} at head dim "
              f"{head_dim}")
    if 90 in built:
      reason = (f"the sm90 {direction} kernel is still opt-in; "
                f"{FORCE_ARCH_ENV_VAR}=sm90 runs it")
    if reason not in _logged_arch_choices:
      _logged_arch_choices.add(reason)
      logger.warning("jax_flash: running the sm80 kernel on sm_%d: %s",
                     capability, reason)
  return 80


@functools.cache
def register_targets() -> None:
  """Registers the FFI handlers with XLA for the CUDA platform, once.

  Call only when the default backend is a CUDA GPU: jaxlib builds without
  CUDA have no such platform to register with.
  """
  handle = load().handle
  for target, symbol in _HANDLER_SYMBOLS.items():
    jax.ffi.register_ffi_target(
        target, jax.ffi.pycapsule(getattr(handle, symbol)), platform="CUDA")


def fwd_workspace_bytes() -> int:
  """Bytes of scratch the forward call takes (the sm90 kernel's tile
  counter; the sm80 kernel leaves it alone)."""
  return load().handle.jax_flash_fwd_workspace_bytes()


def bwd_workspace_bytes(batch: int, sq: int, sk: int, heads: int,
                        kv_heads: int, head_dim: int, value_dim: int,
                        deterministic: bool) -> int:
  """Bytes of scratch the backward kernel needs for these (local) shapes."""
  size = load().handle.jax_flash_bwd_workspace_bytes(
      batch, sq, sk, heads, kv_heads, head_dim, value_dim, int(deterministic))
  if size < 0:
    raise ValueError(f"jax_flash_bwd_workspace_bytes returned {size}")
  return size


def decode_workspace_bytes(batch: int, sq: int, heads: int, kv_heads: int,
                           head_dim: int, capacity: int) -> int:
  """Bytes of scratch the split-KV decoding kernel needs for these shapes."""
  size = load().handle.jax_flash_decode_workspace_bytes(
      batch, sq, heads, kv_heads, head_dim, capacity)
  if size < 0:
    raise ValueError(f"jax_flash_decode_workspace_bytes returned {size}")
  return size
