"""cuda_shared_library: csrc/ and the generated instantiations, compiled and
linked into one shared library by the steps of build/build_cuda.py.

One genrule runs build/generate_kernels.py (outputs: the files that
@jax_flash_kernels//:kernels.bzl lists), one per source runs
`build_cuda.py compile` (the flags of build/build_cuda.py for the arch the
source is written for) and one runs `build_cuda.py link`.
"""

load(
    "@jax_flash_kernels//:kernels.bzl",
    "ARCHS",
    "ENV",
    "HANDLER_ARCH",
    "KERNELS",
    "PYTHON",
)

_BUILD_CUDA = "//build:build_cuda.py"
_GENERATOR = "//build:generate_kernels.py"
_SCRIPTS = "//build:scripts"
_NVCC = "@cuda_toolkit//:nvcc"
_TOOLKIT = "@cuda_toolkit//:toolkit"
_HEADERS = ["@xla_ffi//:headers", "@cutlass//:headers"]

def _quote(word):
    """word as one shell word."""
    return "'" + word.replace("'", "'\\''") + "'"

def _source_dir(name):
    """A folder of this package's sources, as actions see it."""
    parts = [Label("//:BUILD.bazel").workspace_root, native.package_name(), name]
    return "/".join([p for p in parts if p])

def _compile(name, source, kernel_arch, srcs):
    """A genrule compiling source, with srcs beside it, into <name>.o."""
    command = [PYTHON, "$(location %s)" % _BUILD_CUDA, "compile"]
    command += ["--nvcc", "$(location %s)" % _NVCC]
    command += ["--kernel-arch", str(kernel_arch), "--archs", ARCHS]
    command += ["--csrc", _source_dir("csrc"), "--generated", "$(RULEDIR)/generated"]
    for headers in _HEADERS:
        command += ["--system-include", Label(headers).workspace_root + "/include"]
    command += ["$(location %s)" % source, "$@"]
    native.genrule(
        name = name,
        srcs = [source] + srcs + _HEADERS,
        outs = [name + ".o"],
        tools = [_BUILD_CUDA, _SCRIPTS, _NVCC, _TOOLKIT],
        cmd = " ".join(command),
    )
    return name + ".o"

def cuda_shared_library(name, out, handlers, headers, visibility = None):
    """The FFI handlers and every generated instantiation, linked into out.

    Args:
      name: the target of the library.
      out: its path in this package (jax_flash/_lib/libjax_flash_cuda.so).
      handlers: the FFI handler sources (csrc/ffi/*.cu).
      headers: every header of csrc/; the generator also reads them, to see
        which launch templates exist.
      visibility: of the library.
    """
    kernel_files = [kernel["file"] for kernel in KERNELS]
    generated = ["generated/" + f for f in kernel_files]
    kernel_list = "generated/kernel_list.h"
    native.genrule(
        name = name + "_generated",
        srcs = headers,
        outs = generated + [kernel_list],
        tools = [_GENERATOR, _SCRIPTS],
        cmd = " ".join(
            ["%s=%s" % (k, _quote(v)) for k, v in ENV.items()] +
            [PYTHON, "$(location %s)" % _GENERATOR, "--out $(RULEDIR)/generated",
             "--expect"] + kernel_files + [">/dev/null"],
        ),
    )
    objects = []
    for handler in handlers:
        stem = handler.split("/")[-1].rsplit(".", 1)[0]
        objects.append(_compile("%s_%s" % (name, stem), handler, HANDLER_ARCH,
                                headers + [kernel_list]))
    for kernel, source in zip(KERNELS, generated):
        stem = kernel["file"].rsplit(".", 1)[0]
        objects.append(_compile("%s_%s" % (name, stem), source, kernel["arch"],
                                headers))
    native.genrule(
        name = name,
        srcs = objects,
        outs = [out],
        tools = [_BUILD_CUDA, _SCRIPTS, _NVCC, _TOOLKIT],
        cmd = " ".join([
            PYTHON,
            "$(location %s)" % _BUILD_CUDA,
            "link --nvcc $(location %s) --output $@ $(SRCS)" % _NVCC,
        ]),
        visibility = visibility,
    )
