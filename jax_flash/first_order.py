"""A guard that turns second-order differentiation into a clear error."""

from __future__ import annotations

from typing import Callable

import jax


class HigherOrderDerivativeError(NotImplementedError):
  """Raised when a derivative of jax_flash's backward pass is requested."""


def first_order_only(fn: Callable) -> Callable:
  """Wraps a backward computation so that differentiating it raises.

  jax_flash's backward passes recompute attention blockwise; they are exact
  first derivatives but are not themselves differentiable. Without this
  guard, reverse-over-reverse would fail deep inside JAX with a message about
  while loops.
  """

  @jax.custom_vjp
  def wrapped(*args):
    return fn(*args)

  def wrapped_fwd(*args):
    return fn(*args), None

  def wrapped_bwd(_, __):
    raise HigherOrderDerivativeError(
        "jax_flash.flash_attention supports first derivatives only; a "
        "second derivative (e.g. grad of grad, hessian) was requested.")

  wrapped.defvjp(wrapped_fwd, wrapped_bwd)
  return wrapped
