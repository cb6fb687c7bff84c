"""Builds jax_flash: a pure-Python package plus an optional CUDA library.

The CUDA build (see build/build_cuda.py) is controlled by JAX_FLASH_BUILD_CUDA:
"auto" (default: build when nvcc is found), "1" (must build), "0" (skip).
The wheel ships the library only when this build made it (a library left in
jax_flash/_lib/ by an earlier build is never packaged by one that skipped
it), and is then tagged py3-none-<platform>: the library is loaded with
ctypes and has no Python ABI, so one wheel serves every Python version.
"""

import importlib.util
import os
import pathlib
from typing import Optional

import setuptools
from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

try:
  from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # setuptools < 70.1 has it from the wheel package
  from wheel.bdist_wheel import bdist_wheel

ROOT = pathlib.Path(__file__).resolve().parent
LIBRARY_DATA = "_lib/libjax_flash_cuda.so"
"""The CUDA library, relative to the jax_flash package."""


def _load_builder():
  """build/build_cuda.py as a module."""
  spec = importlib.util.spec_from_file_location(
      "jax_flash_build_cuda", ROOT / "build" / "build_cuda.py")
  builder = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(builder)
  return builder


def _build_cuda_library() -> Optional[pathlib.Path]:
  """Builds jax_flash/_lib/libjax_flash_cuda.so as JAX_FLASH_BUILD_CUDA says.

  Returns the library, or None when it was not built. "auto" skips with one
  line when nvcc or jax (whose FFI headers the handlers include) is missing,
  or when the compile fails; "1" raises then.
  """
  builder = _load_builder()
  mode = os.environ.get("JAX_FLASH_BUILD_CUDA", "auto").strip().lower()
  if mode in ("0", "false", "off", "no"):
    builder.console.say(
        "jax_flash: JAX_FLASH_BUILD_CUDA=0: the CUDA path is not built")
    return None
  forced = mode in ("1", "true", "on", "yes")
  if builder.find_nvcc() is None:
    reason = "nvcc not found"
  elif importlib.util.find_spec("jax") is None:
    reason = "jax is not importable here (try --no-build-isolation)"
  else:
    try:
      return builder.build_from_env()
    except Exception as e:  # pylint: disable=broad-except
      if forced:
        raise
      reason = f"the CUDA build failed ({e})"
  if forced:
    raise RuntimeError(f"JAX_FLASH_BUILD_CUDA=1 but {reason}")
  builder.console.say(f"jax_flash: {reason}: the CUDA path is not built")
  return None


class Distribution(setuptools.Distribution):
  """Counts the CUDA library, once built, as an extension module: that is
  what makes `install` and `bdist_wheel` treat the package as
  platform-specific."""

  cuda_library_built = False

  def has_ext_modules(self) -> bool:
    return self.cuda_library_built or super().has_ext_modules()


class BuildPyWithCuda(build_py):
  """build_py that first builds the CUDA library, shipped as package data
  only when this build made it."""

  def run(self):
    if _build_cuda_library() is not None:
      self.distribution.cuda_library_built = True
      # setup() excludes the library, which may be stale; this one is new.
      self.package_data = {
          "jax_flash": [*self.package_data["jax_flash"], LIBRARY_DATA]}
      self.exclude_package_data = {}
      # Other commands may have listed the data files already.
      self.data_files = self._get_data_files()
    else:
      # Nor may a library that an earlier build copied to the build directory
      # be packaged.
      (pathlib.Path(self.build_lib) / "jax_flash" / LIBRARY_DATA).unlink(
          missing_ok=True)
    super().run()


class BdistWheelPy3(bdist_wheel):
  """bdist_wheel tagging a wheel with the CUDA library py3-none-<platform>
  (platform-specific, for any Python 3), and one without it py3-none-any."""

  def run(self):
    self.run_command("build")  # decides whether the library is shipped
    self.root_is_pure = not self.distribution.has_ext_modules()
    super().run()

  def get_tag(self):
    python, abi, platform = super().get_tag()
    if self.root_is_pure:
      return python, abi, platform
    return "py3", "none", platform


setup(
    packages=find_packages(include=["jax_flash", "jax_flash.*"]),
    package_data={"jax_flash": ["py.typed"]},
    # Kept out even when an old SOURCES.txt lists it; BuildPyWithCuda ships
    # the library that the build in progress made.
    exclude_package_data={"jax_flash": [LIBRARY_DATA]},
    distclass=Distribution,
    cmdclass={"build_py": BuildPyWithCuda, "bdist_wheel": BdistWheelPy3},
)
