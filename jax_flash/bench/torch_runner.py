"""Feeding and timing PyTorch SDPA, by the same method as the JAX rows.

Tensors are allocated as (B, S, H, D), the layout the JAX rows use, and
handed to `scaled_dot_product_attention` as (B, H, S, D) views.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from jax_flash.bench import timing
from jax_flash.bench.cases import Case
from jax_flash.bench.implementations import Implementation


def available() -> Optional[str]:
  """None when PyTorch can run on a CUDA device here, else why not."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    return "torch is not installed"
  if not torch.cuda.is_available():
    return "torch sees no CUDA device"
  return None


def measure(impl: Implementation, case: Case, mode: str, n_sets: int,
            seed: int, **timing_options: Any
            ) -> tuple[timing.Timing, Optional[tuple[np.ndarray, ...]],
                       Optional[int]]:
  """Times one mode of a PyTorch implementation.

  Returns:
    The timing; for "fwd", (out, q, k, v) of batch row 0 as float32 NumPy
    arrays in (S, H, D) layout for the check; for "fwd_bwd", the peak bytes
    allocated during one call (inputs included).
  """
  import torch  # pylint: disable=import-outside-toplevel
  dtype = getattr(torch, case.dtype)
  generator = torch.Generator(device="cuda").manual_seed(seed)
  grad = mode != "fwd"

  def tensor(seq_len: int, heads: int, requires_grad: bool) -> Any:
    x = torch.randn(case.batch, seq_len, heads, case.head_dim,
                    generator=generator, device="cuda", dtype=dtype)
    return x.transpose(1, 2).detach().requires_grad_(requires_grad)

  sets = [(tensor(case.q_len, case.heads, grad),
           tensor(case.kv_len, case.kv_heads, grad),
           tensor(case.kv_len, case.kv_heads, grad),
           tensor(case.q_len, case.heads, False)) for _ in range(n_sets)]
  attend = impl.build(case)
  check, peak = None, None
  with impl.context():
    if mode == "fwd":
      def launch(i):
        q, k, v, _ = sets[i % n_sets]
        with torch.no_grad():
          return attend(q, k, v)
    elif mode == "fwd_bwd":
      def launch(i):
        q, k, v, dout = sets[i % n_sets]
        return torch.autograd.grad(attend(q, k, v), (q, k, v), dout)
    else:
      outs = [attend(q, k, v) for q, k, v, _ in sets]
      def launch(i):
        q, k, v, dout = sets[i % n_sets]
        return torch.autograd.grad(outs[i % n_sets], (q, k, v), dout,
                                   retain_graph=True)
    result = timing.time_calls(launch, lambda _: torch.cuda.synchronize(),
                               **timing_options)
    if mode == "fwd":
      rows = [x[0].transpose(0, 1).float().cpu().numpy()
              for x in (launch(0),) + sets[0][:3]]
      check = tuple(rows)
    if mode == "fwd_bwd":
      torch.cuda.synchronize()
      torch.cuda.reset_peak_memory_stats()
      before = torch.cuda.memory_allocated()
      launch(0)
      torch.cuda.synchronize()
      one_set = sum(x.numel() * x.element_size() for x in sets[0])
      peak = torch.cuda.max_memory_allocated() - before + one_set
  del sets
  torch.cuda.empty_cache()  # Leave the memory to the JAX rows that follow.
  return result, check, peak
