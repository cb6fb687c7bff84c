"""Builds jax_flash: a pure-Python package plus an optional CUDA library.

The CUDA build (see build/build_cuda.py) is controlled by JAX_FLASH_BUILD_CUDA:
"auto" (default: build when nvcc is found), "1" (must build), "0" (skip).
"""

import importlib.util
import os
import pathlib

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

# --- CUDA library -----------------------------------------------------------
ROOT = pathlib.Path(__file__).resolve().parent


def _build_cuda_library() -> None:
  """Builds jax_flash/_lib/libjax_flash_cuda.so as JAX_FLASH_BUILD_CUDA says.

  "auto" skips with one log line when nvcc or jax (whose FFI headers the
  handlers include) is missing, or when the compile fails; "1" raises then.
  Under pip's build isolation jax is absent: use
  `pip install --no-build-isolation .` to build the CUDA path.
  """
  mode = os.environ.get("JAX_FLASH_BUILD_CUDA", "auto").strip().lower()
  if mode in ("0", "false", "off", "no"):
    print("jax_flash: JAX_FLASH_BUILD_CUDA=0: the CUDA path is not built")
    return
  forced = mode in ("1", "true", "on", "yes")
  spec = importlib.util.spec_from_file_location(
      "jax_flash_build_cuda", ROOT / "build" / "build_cuda.py")
  builder = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(builder)
  if builder.find_nvcc() is None:
    reason = "nvcc not found"
  elif importlib.util.find_spec("jax") is None:
    reason = "jax is not importable here (try --no-build-isolation)"
  else:
    try:
      builder.build_from_env()
      return
    except Exception as e:  # pylint: disable=broad-except
      if forced:
        raise
      reason = f"the CUDA build failed ({e})"
  if forced:
    raise RuntimeError(f"JAX_FLASH_BUILD_CUDA=1 but {reason}")
  print(f"jax_flash: {reason}: the CUDA path is not built")


class BuildPyWithCuda(build_py):
  """build_py that first builds the CUDA library, shipped as package data."""

  def run(self):
    _build_cuda_library()
    super().run()
# --- end CUDA library -------------------------------------------------------

setup(
    packages=find_packages(include=["jax_flash", "jax_flash.*"]),
    package_data={"jax_flash": ["_lib/*.so", "py.typed"]},
    cmdclass={"build_py": BuildPyWithCuda},
)
