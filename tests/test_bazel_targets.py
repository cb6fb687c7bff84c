"""The Bazel build names every source the pip build compiles (CPU only).

Bazel is not needed: the WORKSPACE's repository rules, the macro of
build/cuda_library.bzl and BUILD.bazel are Starlark, which runs as Python
here against stand-ins for Bazel's built-ins. The repository rule that lists
the instantiations runs build/generate_kernels.py and build/build_cuda.py for
real, so the targets are compared with what the pip build would compile.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys
import types
from typing import Any, Callable, Mapping

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
NARROWING = ("JAX_FLASH_CUDA_ARCHS", "JAX_FLASH_HEAD_DIMS", "JAX_FLASH_DTYPES",
             "JAX_FLASH_DIRECTIONS")


def _load_script(name: str):
  spec = importlib.util.spec_from_file_location(
      name, ROOT / "build" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up
  spec.loader.exec_module(module)
  return module


builder = _load_script("build_cuda")
generator = builder.generate_kernels


@dataclasses.dataclass(frozen=True)
class Label:
  """Bazel's Label, for labels of this repository and external ones."""

  text: str

  @property
  def workspace_root(self) -> str:
    repo = self.text.split("//")[0].lstrip("@")
    return f"external/{repo}" if repo else ""

  def source_path(self) -> pathlib.Path:
    package, name = self.text.split("//")[1].split(":")
    return ROOT / package / name


def _fail(message: str) -> None:
  raise AssertionError(message)


def _starlark(path: pathlib.Path, loads: Mapping[str, Mapping[str, Any]],
              **builtins) -> dict:
  """Runs a Starlark file; `load` takes names from loads[label]."""
  namespace = {"Label": Label, "fail": _fail, "json": types.SimpleNamespace(
      decode=json.loads), **builtins}

  def load(label, *names):
    namespace.update({n: loads[label][n] for n in names})

  namespace["load"] = load
  exec(compile(path.read_text(), str(path), "exec"), namespace)  # pylint: disable=exec-used
  return namespace


class RepositoryContext:
  """repository_ctx, enough for the repository rule of the kernel list."""

  def __init__(self, env: Mapping[str, str]):
    # The scripts run with this Python, which has jax.
    env = {"PYTHON_BIN_PATH": sys.executable, **env}
    self.os = types.SimpleNamespace(environ=env)
    self.files: dict[str, str] = {}
    self._env = {k: v for k, v in os.environ.items() if k not in NARROWING}
    self._env.update(env)

  def which(self, program: str):
    return shutil.which(program, path=self._env.get("PATH"))

  def path(self, target):
    path = target.source_path()
    assert path.exists(), target
    return path

  def execute(self, args):
    result = subprocess.run([str(a) for a in args], env=self._env,
                            capture_output=True, text=True)
    return types.SimpleNamespace(return_code=result.returncode,
                                 stdout=result.stdout, stderr=result.stderr)

  def file(self, name: str, content: str) -> None:
    self.files[name] = content


def _repository_rules() -> dict:
  return _starlark(
      ROOT / "build" / "repositories.bzl", {},
      repository_rule=lambda implementation, **_: implementation,
      attr=types.SimpleNamespace(string=lambda **_: None))


def _kernels_bzl(env: Mapping[str, str]) -> dict:
  """@jax_flash_kernels//:kernels.bzl as the repository rule writes it."""
  rctx = RepositoryContext(env)
  _repository_rules()["jax_flash_kernels_repository"](rctx)
  namespace: dict = {}
  exec(rctx.files["kernels.bzl"], namespace)  # pylint: disable=exec-used
  return namespace


@dataclasses.dataclass
class Package:
  """The rules BUILD.bazel declares, by kind."""

  genrules: dict = dataclasses.field(default_factory=dict)
  py_libraries: dict = dataclasses.field(default_factory=dict)

  def compiles(self) -> dict[str, dict]:
    """The compile genrules, by the source they compile."""
    return {rule["srcs"][0]: rule for rule in self.genrules.values()
            if " compile " in rule["cmd"]}


def _glob(include, exclude=()):
  """Bazel's glob over the source tree (files only)."""
  found = {p for pattern in include for p in ROOT.glob(pattern) if p.is_file()}
  found -= {p for pattern in exclude for p in ROOT.glob(pattern)}
  return sorted(str(p.relative_to(ROOT)) for p in found)


def _package(env: Mapping[str, str]) -> Package:
  """BUILD.bazel run with the kernels.bzl that env gives."""
  package = Package()

  def rule(kind: dict) -> Callable:
    def declare(name, **kwargs):
      assert name not in kind, name
      kind[name] = kwargs
    return declare

  native = types.SimpleNamespace(genrule=rule(package.genrules),
                                 package_name=lambda: "")
  macros = _starlark(ROOT / "build" / "cuda_library.bzl",
                     {"@jax_flash_kernels//:kernels.bzl": _kernels_bzl(env)},
                     native=native)
  _starlark(ROOT / "BUILD.bazel",
            {"//build:cuda_library.bzl": macros},
            glob=_glob, exports_files=lambda files: None,
            py_library=rule(package.py_libraries))
  return package


ENVIRONMENTS = [
    {},
    {"JAX_FLASH_HEAD_DIMS": "64,128", "JAX_FLASH_DTYPES": "bf16",
     "JAX_FLASH_DIRECTIONS": "bwd", "JAX_FLASH_CUDA_ARCHS": "80"},
]


@pytest.fixture(scope="module", params=ENVIRONMENTS,
                ids=["default", "narrowed"])
def build(request):
  """(narrowing environment, the package Bazel would see under it)."""
  return request.param, _package(request.param)


def test_generator_genrule_declares_what_the_generator_writes(build):
  env, package = build
  (rule,) = [r for r in package.genrules.values()
             if "generate_kernels.py" in r["cmd"]]
  selected = generator.select(env)
  assert sorted(rule["outs"]) == sorted(
      ["generated/kernel_list.h"] + [f"generated/{k.filename}"
                                     for k in selected])
  for name, value in env.items():
    assert f"{name}='{value}'" in rule["cmd"]
  # The generator sees every header: that is how it finds launch templates.
  assert rule["srcs"] == _relative(builder.headers())


def _relative(paths) -> list[str]:
  return [str(p.relative_to(ROOT)) for p in paths]


def test_every_instantiation_compiles_for_its_arch(build):
  env, package = build
  compiles = package.compiles()
  archs = ",".join(map(str, generator.capabilities(env)))
  for kernel in generator.select(env):
    rule = compiles[f"generated/{kernel.filename}"]
    assert f"--kernel-arch {kernel.arch} --archs {archs} " in rule["cmd"]


def test_every_handler_compiles_with_every_header(build):
  _, package = build
  compiles = package.compiles()
  headers = _relative(builder.headers())
  for handler in _relative(builder.handler_sources()):
    rule = compiles[handler]
    assert f"--kernel-arch {builder.HANDLER_ARCH} " in rule["cmd"]
    assert set(headers) | {"generated/kernel_list.h"} <= set(rule["srcs"])
  for rule in compiles.values():
    assert set(headers) <= set(rule["srcs"])
    for repo in ("xla_ffi", "cutlass"):
      assert f"@{repo}//:headers" in rule["srcs"]
      assert f"--system-include external/{repo}/include" in rule["cmd"]


def test_csrc_holds_nothing_bazel_does_not_name(build):
  """A new kind of file in csrc/ fails here until both builds take it."""
  _, package = build
  named = {s for rule in package.compiles().values() for s in rule["srcs"]}
  held = {str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*")
          if p.is_file() and p.suffix != ".md"}
  assert held - named == set()
  compiled = {s for s in package.compiles() if s.startswith("csrc/")}
  assert compiled == {s for s in held if s.endswith(".cu")}
  assert compiled == set(_relative(builder.handler_sources()))


def test_library_links_every_object(build):
  _, package = build
  rule = package.genrules["libjax_flash_cuda"]
  assert rule["outs"] == ["jax_flash/_lib/libjax_flash_cuda.so"]
  assert " link " in rule["cmd"]
  objects = {out for r in package.compiles().values() for out in r["outs"]}
  assert set(rule["srcs"]) == objects


def test_py_library_holds_the_package(build):
  _, package = build
  library = package.py_libraries["jax_flash"]
  assert set(library["srcs"]) == set(_relative(
      (ROOT / "jax_flash").rglob("*.py")))
  assert set(library["data"]) == {"jax_flash/py.typed", ":libjax_flash_cuda"}


def test_nothing_is_downloaded():
  """The WORKSPACE builds offline: local repositories only."""
  for path in [ROOT / "WORKSPACE", *(ROOT / "build").glob("*.bzl")]:
    text = path.read_text()
    for remote in ("http_archive", "http_file", "git_repository",
                   ".download", "maybe("):
      assert remote not in text, (path, remote)
