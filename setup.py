"""Builds jax_flash: a pure-Python package plus an optional CUDA library.

The CUDA build (see build/build_cuda.py) is controlled by JAX_FLASH_BUILD_CUDA:
"auto" (default: build when nvcc is found), "1" (must build), "0" (skip).
"""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["jax_flash", "jax_flash.*"]),
    package_data={"jax_flash": ["_lib/*.so"]},
)
