#!/usr/bin/env bash
# Installs a jax_flash wheel into a fresh directory and runs the GPU test
# suite against that installation, not the source tree. On a CUDA machine
# with jax[cuda] and pytest installed, after `python build/build_wheel.py`
# (here or elsewhere):
#
#   bash tools/gpu/test_installed_wheel.sh [WHEEL] [PYTEST ARGS...]
#
# WHEEL defaults to the newest dist/jax_flash-*.whl. The tests are copied to
# a directory of their own and run from there, with only the installation on
# PYTHONPATH, and the script first checks that `import jax_flash` and its
# CUDA library both come from the installation and that the kernels can run
# (the GPU tests skip themselves otherwise, which would pass silently).
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
wheel=${1:-$(ls -t "$repo"/dist/jax_flash-*.whl | head -n 1)}
shift || true
work=$(mktemp -d /tmp/jax_flash_wheel.XXXXXX)
python3 -m pip install --quiet --no-deps --target "$work/site" "$wheel"
cp -r "$repo/tests" "$work/tests"
cd "$work"
export PYTHONPATH="$work/site" XLA_PYTHON_CLIENT_PREALLOCATE=false
# Correctness only: no GEMM autotuning of the reference's many shapes.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0"
python3 - "$work/site" <<'PY'
import pathlib
import sys

import jax_flash
from jax_flash import dispatch
from jax_flash.cuda import library

site = pathlib.Path(sys.argv[1]).resolve()
package = pathlib.Path(jax_flash.__file__).resolve()
if site not in package.parents:
  sys.exit(f"jax_flash comes from {package}, not from {site}")
if site not in library.library_path().resolve().parents:
  sys.exit(f"the CUDA library is looked for at {library.library_path()}")
reason = dispatch.cuda_unavailable_reason()
if reason is not None:
  sys.exit(f"the CUDA kernels cannot run: {reason}")
print(f"jax_flash {jax_flash.__version__} from {package.parent}; "
      f"library {library.load().build_info}")
PY
python3 -m pytest -q -p no:cacheprovider -rs tests/test_cuda_kernels.py "$@"
