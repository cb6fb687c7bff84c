// jax_flash_build_info(): what this library was compiled with, so that Python
// can fall back to the blockwise path for anything not listed.
#include "kernel_list.h"

#ifndef JAX_FLASH_CUDA_ARCHS
#error "build/build_cuda.py defines JAX_FLASH_CUDA_ARCHS, e.g. \"80,90\""
#endif

// `direction:dtype:headdim` items separated by ';', then `|archs=80,90`.
extern "C" const char* jax_flash_build_info(void) {
  return JAX_FLASH_KERNEL_INFO "|archs=" JAX_FLASH_CUDA_ARCHS;
}
