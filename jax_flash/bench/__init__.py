"""Benchmarks of jax_flash against every attention a JAX user can pick.

Run `python -m jax_flash.bench` (see `--help`); `--quick` is a seconds-long
smoke test that runs on a CPU. Layout: `cases` (the grid), `flops` (work
counts), `timing` (the one timing helper), `implementations` (who is
measured), `jax_runner`/`torch_runner` (feeding and timing each framework),
`checks` (a correctness check of every forward), `runner` (one case, all
implementations), `report` (markdown), `plots` (PNG), `environment`.
"""
