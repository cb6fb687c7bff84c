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
import os
import pathlib
import sys
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import console
LIBRARY = (pathlib.Path(__file__).resolve().parents[1] / "jax_flash" / "_lib"
           / "libjax_flash_cuda.so")
def find_nvcc():
  return os.environ.get("NVCC") or None
def build_from_env():
  LIBRARY.parent.mkdir(exist_ok=True)
  LIBRARY.write_bytes(b"fresh")
  return LIBRARY
'''


@pytest.fixture
def tree(tmp_path: pathlib.Path) -> pathlib.Path:
  """A copy of the package whose CUDA build writes a small fake library."""
  for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE"):
    shutil.copy(REPO / name, tmp_path / name)
  ignore = shutil.ignore_patterns("__pycache__", "_lib", "out", "generated",
                                  "lib*", "bdist*")
  shutil.copytree(REPO / "jax_flash", tmp_path / "jax_flash", ignore=ignore)
  shutil.copytree(REPO / "build", tmp_path / "build", ignore=ignore)
  (tmp_path / "build" / "build_cuda.py").write_text(FAKE_BUILDER)
  return tmp_path


def build_wheel(tree: pathlib.Path, build_cuda: str,
                nvcc: str = "") -> pathlib.Path:
  """bdist_wheel in `tree`, as pip builds a local directory: in place."""
  shutil.rmtree(tree / "dist", ignore_errors=True)
  env = dict(os.environ, JAX_FLASH_BUILD_CUDA=build_cuda, NVCC=nvcc)
  # A new session has no terminal: build messages go to the captured stdout.
  done = subprocess.run(
      [sys.executable, "setup.py", "-q", "bdist_wheel", "-d", "dist"],
      cwd=tree, env=env, capture_output=True, text=True,
      start_new_session=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  (wheel,) = (tree / "dist").glob("*.whl")
  return wheel


def test_a_wheel_with_the_library_claims_no_python_abi(tree):
  wheel = build_wheel(tree, "1", nvcc="nvcc")
  assert re.fullmatch(r"jax_flash-0\.1\.0-py3-none-linux_\w+\.whl",
                      wheel.name), wheel.name
  with zipfile.ZipFile(wheel) as archive:
    library = archive.read("jax_flash/_lib/libjax_flash_cuda.so")
    metadata = archive.read("jax_flash-0.1.0.dist-info/WHEEL").decode()
  assert library == b"fresh"
  assert "Root-Is-Purelib: false" in metadata


@pytest.mark.parametrize("build_cuda", ["0", "auto"])
def test_a_build_without_cuda_ships_no_stale_library(tree, build_cuda):
  build_wheel(tree, "1", nvcc="nvcc")  # leaves the library in the tree
  wheel = build_wheel(tree, build_cuda)
  assert wheel.name == "jax_flash-0.1.0-py3-none-any.whl"
  with zipfile.ZipFile(wheel) as archive:
    names = archive.namelist()
  assert not [n for n in names if "_lib" in n]
  assert "jax_flash/py.typed" in names
  assert "jax_flash-0.1.0.dist-info/LICENSE" in names


def test_wheel_check_lists_the_built_kernels_per_arch():
  """build/build_wheel.py's summary of a library, read through the loader
  (in a process of its own: it points JAX_FLASH_CUDA_LIBRARY at the file)."""
  library = REPO / "jax_flash" / "_lib" / "libjax_flash_cuda.so"
  if not library.exists():
    pytest.skip("no CUDA library built")
  code = ("import pathlib, sys; sys.path.insert(0, 'build'); "
          "import build_wheel; "
          f"print(build_wheel.describe_library(pathlib.Path({str(library)!r})))")
  done = subprocess.run([sys.executable, "-c", code], cwd=REPO,
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr[-3000:]
  lines = done.stdout.splitlines()
  assert re.fullmatch(r"CUDA library [\d.]+ MiB for sm_\d+(, sm_\d+)*",
                      lines[0]), lines[0]
  kernels = [line for line in lines[1:]
             if re.fullmatch(r"  sm\d+ (fwd|bwd|decode) (bf16|fp16): head dims "
                             r"\d+(, \d+)*", line)]
  assert kernels and len(kernels) == len(lines) - 1, done.stdout
