"""Host-side checks of arithmetic the CUDA kernels derive by hand.

Each program in tests/csrc/ runs the kernels' own functions on the host:
check_bwd_layouts.cu compares the sm90 backward's address shortcuts with
cute's layouts for every thread; check_dq_order.cu checks the deterministic
dQ order for many masks and simulates launches of it to completion;
check_fwd_tiles.cu checks the sm90 forward's tile order and simulates its
persistent schedule; check_decode_layouts.cu checks the swizzled layout the
decoding kernel reads tensor-copied K/V tiles in. They
need nvcc and the CUTLASS headers (nvidia-cutlass) but no GPU.
"""
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "build"))
import build_cuda  # pylint: disable=wrong-import-position


@pytest.mark.parametrize("program", ["check_bwd_layouts.cu",
                                     "check_dq_order.cu",
                                     "check_fwd_tiles.cu",
                                     "check_decode_layouts.cu"])
def test_kernel_addresses_match_cute_layouts(program, tmp_path):
  nvcc = build_cuda.find_nvcc()
  if nvcc is None:
    pytest.skip("nvcc not found")
  dirs = build_cuda.include_dirs()
  if "cutlass" not in dirs:
    pytest.skip("nvidia-cutlass headers not installed")
  binary = tmp_path / "check"
  compiled = subprocess.run(
      [nvcc, "-std=c++17", "--expt-relaxed-constexpr", "-arch=sm_90a",
       *build_cuda.DEFINES,
       "-I", str(REPO / "csrc"), "-isystem", dirs["cutlass"],
       str(REPO / "tests" / "csrc" / program), "-o", str(binary)],
      capture_output=True, text=True, timeout=600)
  assert compiled.returncode == 0, compiled.stderr[-3000:]
  ran = subprocess.run([str(binary)], capture_output=True, text=True,
                       timeout=60)
  assert ran.returncode == 0, ran.stdout[-3000:]
  assert ran.stdout.count("mismatches: 0") == ran.stdout.count("mismatches")
