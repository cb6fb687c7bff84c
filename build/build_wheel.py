"""Builds the one jax_flash wheel and checks what is in it.

  python build/build_wheel.py            # CUDA library for sm_80 and sm_90,
                                         # every head dim, dtype, direction
  python build/build_wheel.py --cpu-only # no CUDA library: py3-none-any

Runs `pip wheel --no-deps --no-build-isolation .` with JAX_FLASH_BUILD_CUDA=1
(so that a missing nvcc or a failed compile is an error, not a CPU-only
wheel; the environment's jax provides the XLA FFI headers). The library has
no Python ABI, so the wheel is tagged py3-none-<platform> and installs on
every Python 3 the package supports. The narrowing variables of
build/build_cuda.py (JAX_FLASH_CUDA_ARCHS, JAX_FLASH_HEAD_DIMS,
JAX_FLASH_DTYPES, JAX_FLASH_DIRECTIONS) pass through, for quick test builds.

Then it opens the wheel, checks its tag and files, loads its library (no GPU
needed) and prints the kernels and architectures it was built for. Install
and test it on a GPU machine with tools/gpu/test_installed_wheel.sh.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import zipfile

REPO = pathlib.Path(__file__).resolve().parent.parent
LIBRARY = "jax_flash/_lib/libjax_flash_cuda.so"


def build_wheel(out: pathlib.Path, with_cuda: bool) -> pathlib.Path:
  """Runs pip wheel; returns the wheel it wrote."""
  env = dict(os.environ, JAX_FLASH_BUILD_CUDA="1" if with_cuda else "0")
  # Without a terminal the build's progress lines go to pip's captured
  # output, which pip shows only with -v (build/console.py).
  verbose = [] if sys.stdout.isatty() else ["-v"]
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                  "--no-build-isolation", *verbose, "-w", str(out), str(REPO)],
                 env=env, check=True)
  return max(out.glob("jax_flash-*.whl"), key=lambda p: p.stat().st_mtime)


def check_wheel(wheel: pathlib.Path, with_cuda: bool) -> str:
  """Raises if the wheel's tag or files are wrong; describes its library."""
  tag = re.fullmatch(r"jax_flash-[^-]+-(.+)\.whl", wheel.name).group(1)
  python, abi, platform = tag.split("-")
  expected_platform = platform != "any" if with_cuda else platform == "any"
  if (python, abi) != ("py3", "none") or not expected_platform:
    raise SystemExit(f"{wheel.name}: unexpected tag {tag}")
  with zipfile.ZipFile(wheel) as archive:
    names = archive.namelist()
    for needed in ("jax_flash/__init__.py", "jax_flash/py.typed"):
      if needed not in names:
        raise SystemExit(f"{wheel.name} lacks {needed}")
    if (LIBRARY in names) != with_cuda:
      raise SystemExit(f"{wheel.name}: CUDA library "
                       f"{'missing' if with_cuda else 'present'}")
    if not with_cuda:
      return "no CUDA library"
    with tempfile.TemporaryDirectory() as tmp:
      path = pathlib.Path(archive.extract(LIBRARY, tmp))
      return describe_library(path)


def describe_library(path: pathlib.Path) -> str:
  """Size, kernels and archs of a library, read through jax_flash's loader."""
  os.environ["JAX_FLASH_CUDA_LIBRARY"] = str(path)
  sys.path.insert(0, str(REPO))
  from jax_flash.cuda import library  # pylint: disable=import-outside-toplevel
  info = library.load().build_info
  lines = [f"CUDA library {path.stat().st_size / 2**20:.1f} MiB for "
           + ", ".join(f"sm_{a}" for a in info.archs)]
  for arch in sorted({a for a, _, _, _ in info.kernels}):
    for direction in ("fwd", "bwd", "decode"):
      for dtype in ("bf16", "fp16"):
        dims = sorted(d for a, k, t, d in info.kernels
                      if (a, k, t) == (arch, direction, dtype))
        if dims:
          lines.append(f"  sm{arch} {direction} {dtype}: head dims "
                       + ", ".join(map(str, dims)))
  return "\n".join(lines)


def main() -> None:
  """Command line entry point."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=pathlib.Path, default=REPO / "dist")
  parser.add_argument("--cpu-only", action="store_true",
                      help="build without the CUDA library")
  args = parser.parse_args()
  args.out.mkdir(parents=True, exist_ok=True)
  wheel = build_wheel(args.out, not args.cpu_only)
  print(f"{wheel}\n{check_wheel(wheel, not args.cpu_only)}")


if __name__ == "__main__":
  main()
