#!/usr/bin/env bash
# Checks a built tree on a CUDA machine, from the source tree: the GPU test
# suite, the kernel check scripts, and compute-sanitizer (memcheck on every
# kernel, racecheck on small shapes). Logs go to $OUT (default
# /tmp/jax_flash_verify); a summary table is printed last.
#
#   JAX_FLASH_CUDA_ARCHS=80,90 python build/build_cuda.py   # first
#   bash tools/gpu/verify_on_gpu.sh
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/jax_flash_verify}
mkdir -p "$OUT"
export PYTHONPATH=.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
# Correctness only: XLA's GEMM autotuning of every new reference shape
# would take most of the time (about 13 s a case against 2.5 s without).
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0"
LIB=jax_flash/_lib/libjax_flash_cuda.so
summary=()
step() {  # step NAME TIMEOUT COMMAND...
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  summary+=("$(printf '%-14s rc=%-3s %4ss  %s' "$name" "$rc" \
    $((SECONDS - start)) "$(grep -v '^\s*$' "$OUT/$name.log" | tail -n 1)")")
}

nvidia-smi --query-gpu=name,driver_version --format=csv,noheader \
  > "$OUT/gpu.txt" 2>&1
# The GPU suite once per kernel arch (sm90 where built, sm80 for the rest),
# and the decoding kernel's own tests.
step pytest_sm80 "${PYTEST_LIMIT:-240}" env JAX_FLASH_FORCE_ARCH=sm80 \
  python3 -m pytest -q -p no:cacheprovider tests/test_cuda_kernels.py
step pytest_sm90 "${PYTEST_LIMIT:-240}" env JAX_FLASH_FORCE_ARCH=sm90 \
  python3 -m pytest -q -p no:cacheprovider tests/test_cuda_kernels.py
step pytest_decode "${PYTEST_LIMIT:-240}" \
  python3 -m pytest -q -p no:cacheprovider tests/test_cuda_decode.py
if [[ -n "${WITH_CHECK_SCRIPTS:-}" ]]; then  # slower; the suite covers them
  step check_fwd 240 python3 tools/gpu/check_fwd.py --skip-timing --lib "$LIB"
  step check_bwd 300 python3 tools/gpu/check_bwd.py --skip-timing --no-torch \
    --library "$LIB"
fi
SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
step memcheck "${SAN_LIMIT:-120}" "$SAN" --tool memcheck --error-exitcode 3 \
  --kernel-name kns=flash python3 tools/gpu/sanitize_cases.py
# The sm90 forward and the decoding kernel: memcheck, racecheck, synccheck.
for tool in memcheck racecheck synccheck; do
  step "${tool}_new" "${SAN_LIMIT:-120}" env JAX_FLASH_FORCE_ARCH=sm90 \
    "$SAN" --tool "$tool" --error-exitcode 3 \
    --kernel-name kns=flash python3 tools/gpu/sanitize_cases.py --small
done
step racecheck "${SAN_LIMIT:-100}" "$SAN" --tool racecheck --error-exitcode 3 \
  --kernel-name kns=flash python3 tools/gpu/sanitize_cases.py --small
# The leaner kernels an A100 runs (one K/V or Q/dO stage), on this GPU.
step racecheck_a100 "${SAN_LIMIT:-100}" env JAX_FLASH_MAX_SMEM_PER_BLOCK=166912 \
  "$SAN" --tool racecheck --error-exitcode 3 --kernel-name kns=flash \
  python3 tools/gpu/sanitize_cases.py --small

echo "GPU: $(cat "$OUT/gpu.txt")"
printf '%s\n' "${summary[@]}" | tee "$OUT/summary.txt"
