"""What an installation ships and what a user without the extras is told."""

import importlib
import os
import pathlib
import re
import shutil
import subprocess
import sys
import zipfile

import pytest


def test_flax_extra_named_when_flax_is_missing(monkeypatch):
  monkeypatch.setitem(sys.modules, "flax", None)  # makes `import flax` fail
  for name in [m for m in sys.modules if m.startswith("jax_flash.flax")]:
    monkeypatch.delitem(sys.modules, name)
  with pytest.raises(ImportError, match=r'pip install "jax_flash\[flax\]"'):
    importlib.import_module("jax_flash.flax")


REPO = pathlib.Path(__file__).resolve().parents[1]

FAKE_BUILDER = '''
"""Stands in for build_cuda.py: "builds" a library of known bytes."""
import pathlib
import sys
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import console
LIBRARY = (pathlib.Path(__file__).resolve().parents[1] / "jax_flash" / "_lib"
           / "libjax_flash_cuda.so")
def find_nvcc():
  return "nvcc"
def build_from_env():
  LIBRARY.write_bytes(b"fresh")
  return LIBRARY
'''


def build_wheel(tree: pathlib.Path, build_cuda: str) -> pathlib.Path:
  """bdist_wheel of a copy of the package, a stale library already in it."""
  for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE"):
    shutil.copy(REPO / name, tree / name)
  ignore = shutil.ignore_patterns("__pycache__", "_lib", "out", "generated")
  shutil.copytree(REPO / "jax_flash", tree / "jax_flash", ignore=ignore)
  shutil.copytree(REPO / "build", tree / "build", ignore=ignore)
  (tree / "jax_flash" / "_lib").mkdir()
  (tree / "jax_flash" / "_lib" / "libjax_flash_cuda.so").write_bytes(b"stale")
  if build_cuda == "1":
    (tree / "build" / "build_cuda.py").write_text(FAKE_BUILDER)
  env = dict(os.environ, JAX_FLASH_BUILD_CUDA=build_cuda,
             NVCC=str(tree / "no-nvcc"))
  # A new session has no terminal: build messages go to the captured stdout.
  done = subprocess.run(
      [sys.executable, "setup.py", "-q", "bdist_wheel", "-d", "dist"],
      cwd=tree, env=env, capture_output=True, text=True,
      start_new_session=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  (wheel,) = (tree / "dist").glob("*.whl")
  return wheel


@pytest.mark.parametrize("build_cuda", ["0", "auto"])
def test_a_build_without_cuda_ships_no_stale_library(tmp_path, build_cuda):
  wheel = build_wheel(tmp_path, build_cuda)
  assert wheel.name == "jax_flash-0.1.0-py3-none-any.whl"
  with zipfile.ZipFile(wheel) as archive:
    names = archive.namelist()
  assert not [n for n in names if "_lib" in n]
  assert "jax_flash/py.typed" in names
  assert "jax_flash-0.1.0.dist-info/LICENSE" in names


def test_a_wheel_with_the_library_claims_no_python_abi(tmp_path):
  wheel = build_wheel(tmp_path, "1")
  assert re.fullmatch(r"jax_flash-0\.1\.0-py3-none-linux_\w+\.whl",
                      wheel.name), wheel.name
  with zipfile.ZipFile(wheel) as archive:
    library = archive.read("jax_flash/_lib/libjax_flash_cuda.so")
    metadata = archive.read("jax_flash-0.1.0.dist-info/WHEEL").decode()
  assert library == b"fresh"
  assert "Root-Is-Purelib: false" in metadata
