"""Builds jax_flash/_lib/libjax_flash_cuda.so from csrc/ with nvcc.

Compiles the FFI handlers (csrc/ffi/*.cu) and the instantiations
build/generate_kernels.py writes, in parallel, into build/out/obj/, and links
them into one shared library with the CUDA runtime linked statically and no
Python ABI (see docs/ffi_contract.md). Rebuilds only objects older than their
source, the headers or the compile flags.

Environment:
  JAX_FLASH_CUDA_ARCHS  compute capabilities, default "80,90": each gets
                        machine code of the sm80 kernels, the newest also
                        their PTX; 90 also builds the sm90 kernels (sm_90a)
  JAX_FLASH_HEAD_DIMS, JAX_FLASH_DTYPES, JAX_FLASH_DIRECTIONS
                        narrow the instantiations (build/generate_kernels.py)
  JAX_FLASH_BUILD_JOBS  parallel compiles, default the CPU count
  NVCC                  the compiler, default `nvcc` on PATH (or CUDA_HOME)

The Bazel build (BUILD.bazel) runs the same steps one at a time through the
subcommands `config` (what the WORKSPACE's local repositories point at),
`compile` (one source) and `link`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import pathlib
import shutil
import subprocess
import sys
import threading
import time
from typing import Optional, Sequence

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import console  # noqa: E402  (sibling script)
import generate_kernels  # noqa: E402  (sibling script)

REPO = generate_kernels.REPO
CSRC = generate_kernels.CSRC
GENERATED = generate_kernels.DEFAULT_OUT
OBJ_DIR = REPO / "build" / "out" / "obj"
LIBRARY = REPO / "jax_flash" / "_lib" / "libjax_flash_cuda.so"
HANDLER_ARCH = 80
"""The FFI handlers compile like the sm80 sources: for every listed arch."""


def find_nvcc() -> Optional[str]:
  """Path of nvcc: $NVCC, then PATH, then $CUDA_HOME/bin; None if absent."""
  if os.environ.get("NVCC"):
    return shutil.which(os.environ["NVCC"])
  found = shutil.which("nvcc")
  if found:
    return found
  for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
               "/usr/local/cuda"):
    if home and (pathlib.Path(home) / "bin" / "nvcc").exists():
      return str(pathlib.Path(home) / "bin" / "nvcc")
  return None


def toolkit_root(nvcc: str) -> str:
  """The CUDA toolkit directory nvcc runs from (a wrapper script on PATH
  may hide it): the parent of the `_HERE_` that `nvcc -dryrun` reports."""
  result = subprocess.run([nvcc, "-dryrun", "-x", "cu", "-c", os.devnull,
                           "-o", os.devnull], capture_output=True, text=True,
                          check=True)
  for line in (result.stdout + result.stderr).splitlines():
    if line.startswith("#$ _HERE_="):
      return str(pathlib.Path(line.split("=", 1)[1]).resolve().parent)
  raise RuntimeError(f"{nvcc} -dryrun did not say where it runs from")


def include_dirs() -> dict[str, str]:
  """Header directories of pip packages, by name: "xla_ffi" (the XLA FFI
  headers, jax.ffi.include_dir()) and, where nvidia-cutlass is installed,
  "cutlass" (CUTLASS/CuTe)."""
  import jax.ffi  # pylint: disable=import-outside-toplevel
  dirs = {"xla_ffi": jax.ffi.include_dir()}
  try:
    import cutlass_library  # pylint: disable=import-outside-toplevel
    cutlass = (pathlib.Path(cutlass_library.__file__).parent / "source" /
               "include")
    if cutlass.exists():
      dirs["cutlass"] = str(cutlass)
  except ImportError:
    pass
  return dirs


def handler_sources(csrc: pathlib.Path = CSRC) -> list[pathlib.Path]:
  """The FFI handlers, csrc/ffi/*.cu: every source not generated."""
  return sorted((csrc / "ffi").glob("*.cu"))


def headers(csrc: pathlib.Path = CSRC) -> list[pathlib.Path]:
  """Every header of csrc/."""
  return sorted(csrc.rglob("*.h"))


# Preprocessor definitions every translation unit that includes csrc/ (and
# CuTe) compiles with. CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED: CuTe's wgmma
# selectors then know every N that is a multiple of 8 (80, 160, 224, 48,
# ...), instead of splitting such a tile into instructions of N = 16 or 32;
# the shapes of its default list are picked as before. The sm90 traits
# assert that one instruction spans each tile's N.
DEFINES = ["-DCUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED"]


def compile_flags(archs: Sequence[int], csrc: pathlib.Path = CSRC,
                  generated: pathlib.Path = GENERATED,
                  system_dirs: Optional[Sequence[str]] = None) -> list[str]:
  """nvcc flags shared by every translation unit (arch_flags adds -gencode).

  system_dirs are the pip packages' header directories, by default
  include_dirs().
  """
  if system_dirs is None:
    system_dirs = list(include_dirs().values())
  flags = ["-O3", "-DNDEBUG", "-std=c++17", "--expt-relaxed-constexpr",
           *DEFINES,
           "-Xcompiler", "-fPIC", "-I", str(csrc), "-I", str(generated),
           f"-DJAX_FLASH_CUDA_ARCHS=\"{','.join(map(str, archs))}\""]
  for d in system_dirs:
    flags += ["-isystem", d]
  return flags


def arch_flags(kernel_arch: int, archs: Sequence[int]) -> list[str]:
  """The -gencode flags of the sources written for one kernel arch.

  sm80 sources (and the FFI handlers): machine code for every listed compute
  capability, and the PTX of the newest, so that later GPUs can JIT-compile
  it. sm90 sources: sm_90a machine code only; their wgmma and TMA
  instructions exist on 9.0 alone, so no PTX could serve a later GPU.
  """
  if kernel_arch == 90:
    return ["-gencode=arch=compute_90a,code=sm_90a"]
  flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
  flags.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
  return flags


def compile_command(nvcc: str, flags: Sequence[str], kernel_arch: int,
                    archs: Sequence[int], source: pathlib.Path,
                    obj: pathlib.Path) -> list[str]:
  """The nvcc command compiling one source written for kernel_arch."""
  return [nvcc, *flags, *arch_flags(kernel_arch, archs), "-c", str(source),
          "-o", str(obj)]


def link_command(nvcc: str, objects: Sequence[pathlib.Path],
                 library: pathlib.Path) -> list[str]:
  """The nvcc command linking the shared library, CUDA runtime static."""
  return [nvcc, "-shared", "-cudart", "static", *map(str, objects), "-o",
          str(library)]


def _stale(obj: pathlib.Path, source: pathlib.Path,
           headers: Sequence[pathlib.Path], stamp: pathlib.Path) -> bool:
  """Whether obj must be rebuilt: missing or older than its inputs."""
  if not obj.exists():
    return True
  newest = max(p.stat().st_mtime for p in [source, stamp, *headers])
  return obj.stat().st_mtime < newest


def _shown(path: pathlib.Path) -> pathlib.Path:
  """`path` relative to the repository when it lies inside it."""
  return path.relative_to(REPO) if path.is_relative_to(REPO) else path


def build(archs: Sequence[int], jobs: int, resource_usage: bool = False,
          library: pathlib.Path = LIBRARY) -> pathlib.Path:
  """Generates, compiles and links; returns the library path."""
  nvcc = find_nvcc()
  if nvcc is None:
    raise RuntimeError("nvcc not found (set NVCC or CUDA_HOME)")
  generated = generate_kernels.generate(
      GENERATED, env={**os.environ,
                      "JAX_FLASH_CUDA_ARCHS": ",".join(map(str, archs))})
  handlers = handler_sources()
  sources = handlers + [path for _, path in generated]
  # Each source compiles for the arch its kernels are written for.
  source_arch = {**{h: HANDLER_ARCH for h in handlers},
                 **{path: k.arch for k, path in generated}}
  inputs = headers() + [GENERATED / "kernel_list.h"]
  flags = compile_flags(archs)
  if resource_usage:
    flags.append("--resource-usage")

  OBJ_DIR.mkdir(parents=True, exist_ok=True)
  # Changing the flags (archs, include dirs) rebuilds everything.
  stamp = OBJ_DIR / "flags.txt"
  stamp_text = "\n".join(flags + [
      f for a in generate_kernels.KERNEL_ARCHS for f in arch_flags(a, archs)])
  if not stamp.exists() or stamp.read_text() != stamp_text:
    stamp.write_text(stamp_text)
  objects = [OBJ_DIR / (s.stem + ".o") for s in sources]
  todo = [(s, o) for s, o in zip(sources, objects)
          if resource_usage or _stale(o, s, inputs, stamp)]

  lock = threading.Lock()
  done = [0]

  def compile_one(source: pathlib.Path, obj: pathlib.Path) -> None:
    cmd = compile_command(nvcc, flags, source_arch[source], archs, source,
                          obj)
    result = subprocess.run(cmd, capture_output=True, text=True)
    with lock:
      done[0] += 1
      console.say(f"[{done[0]}/{len(todo)}] {source.relative_to(REPO)}")
      if result.stdout.strip() or result.stderr.strip():
        console.say(result.stdout + result.stderr)
    if result.returncode != 0:
      raise RuntimeError(f"nvcc failed on {source.relative_to(REPO)}")

  started = time.monotonic()
  console.say(f"jax_flash: compiling {len(todo)} of {len(sources)} CUDA files "
              f"({_kernels_wanted()}) for sm_{', sm_'.join(map(str, archs))} "
              f"with {jobs} jobs; JAX_FLASH_BUILD_CUDA=0 skips this build")
  with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
    futures = [pool.submit(compile_one, s, o) for s, o in todo]
    for f in futures:
      f.result()

  library.parent.mkdir(parents=True, exist_ok=True)
  if todo or not library.exists() or any(
      o.stat().st_mtime > library.stat().st_mtime for o in objects):
    link = link_command(nvcc, objects, library)
    console.say(f"linking {_shown(library)}")
    subprocess.run(link, check=True)
  console.say(f"jax_flash: built {_shown(library)} "
              f"({library.stat().st_size / 2**20:.1f} MiB) in "
              f"{time.monotonic() - started:.0f} s")
  return library


def _kernels_wanted() -> str:
  """The narrowing variables as the build sees them, for its first line."""
  return ", ".join(
      f"{name} {os.environ.get(variable) or 'all'}" for name, variable
      in (("head dims", "JAX_FLASH_HEAD_DIMS"), ("dtypes", "JAX_FLASH_DTYPES"),
          ("directions", "JAX_FLASH_DIRECTIONS")))


def build_from_env(resource_usage: bool = False) -> pathlib.Path:
  """`build` with the archs and job count of the environment variables."""
  archs = generate_kernels.capabilities()
  jobs = int(os.environ.get("JAX_FLASH_BUILD_JOBS", os.cpu_count() or 1))
  return build(archs, jobs, resource_usage=resource_usage)


def config() -> dict:
  """What the Bazel build takes from here: this Python, HANDLER_ARCH, the
  toolkit directory of find_nvcc() (None where there is no nvcc) and the
  include_dirs()."""
  nvcc = find_nvcc()
  return {"python": sys.executable, "handler_arch": HANDLER_ARCH,
          "toolkit": toolkit_root(nvcc) if nvcc else None,
          "include_dirs": include_dirs()}


def main() -> None:
  """Command line: build the library, or run one step of the Bazel build."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--resource-usage", action="store_true",
                      help="recompile everything and print ptxas register "
                      "and spill counts")
  steps = parser.add_subparsers(
      dest="step", help="one step of the Bazel build (BUILD.bazel); without "
      "one, the whole build runs")
  steps.add_parser("config", help="print config() as JSON")
  compile_step = steps.add_parser("compile", help="compile one source")
  compile_step.add_argument("--nvcc", required=True)
  compile_step.add_argument("--kernel-arch", type=int, required=True,
                            help="the arch the source is written for")
  compile_step.add_argument("--archs", required=True,
                            help="JAX_FLASH_CUDA_ARCHS, e.g. 80,90")
  compile_step.add_argument("--csrc", type=pathlib.Path, required=True)
  compile_step.add_argument("--generated", type=pathlib.Path, required=True)
  compile_step.add_argument("--system-include", action="append", default=[],
                            help="a pip package's header directory")
  compile_step.add_argument("source", type=pathlib.Path)
  compile_step.add_argument("object", type=pathlib.Path)
  link_step = steps.add_parser("link", help="link the shared library")
  link_step.add_argument("--nvcc", required=True)
  link_step.add_argument("--output", type=pathlib.Path, required=True)
  link_step.add_argument("objects", type=pathlib.Path, nargs="+")
  args = parser.parse_args()
  if args.step == "config":
    print(json.dumps(config()))
  elif args.step == "compile":
    archs = generate_kernels.parse_archs(args.archs)
    flags = compile_flags(archs, args.csrc, args.generated,
                          args.system_include)
    sys.exit(subprocess.run(compile_command(
        args.nvcc, flags, args.kernel_arch, archs, args.source,
        args.object)).returncode)
  elif args.step == "link":
    sys.exit(subprocess.run(
        link_command(args.nvcc, args.objects, args.output)).returncode)
  else:
    build_from_env(resource_usage=args.resource_usage)


if __name__ == "__main__":
  main()
