"""What the CUDA kernels can be instantiated for: the one list of the build
and of the package.

build/generate_kernels.py loads this file by its path, without importing
jax_flash (the build must run where jax is absent), so it imports nothing but
the standard library. `jax_flash.cuda.library` reads it only where no library
is loaded; a loaded library reports what it was built with.
"""

HEAD_DIMS = (32, 64, 96, 128, 160, 192, 224, 256)
"""Head dims (D == Dv) an instantiation can have; the Python side zero-pads
the others up to the next one built (docs/ffi_contract.md)."""

DIRECTION_HEAD_DIMS = {"decode": (64, 128, 256)}
"""Directions built for fewer head dims than HEAD_DIMS: the decoding kernel
reads K/V caches in place, so a head dim it lacks is not padded (that would
copy the cache) but served by the forward kernel instead."""

ARCH_DIRECTION_HEAD_DIMS = {(90, "bwd"): (64, 96, 128, 160, 192, 224, 256)}
"""(arch, direction) pairs built for fewer head dims than their direction.
The sm90 backward is built at D = 64, 96, 128, 160, 192, 224 and 256
(csrc/sm90/bwd_tile_size.h; D > 128 with its split-D schedule), where it
runs 1.4-1.5x, 1.7-2.1x, 1.7-1.9x, 1.9-2.2x, 1.8-2.2x, 1.6-1.8x and
2.4-2.8x the sm80 one on an H200 (docs/performance.md); D = 32 runs the
sm80 backward on sm90 GPUs."""

KERNEL_ARCHS = (80, 90)
"""The architectures kernels are written for, the first axis of every
instantiation: sm80 (mma.sync, cp.async; runs on compute capability 8.0 and
later) and sm90 (Hopper-only instructions, compiled for sm_90a; built once
csrc/sm90/ has a launch template)."""
