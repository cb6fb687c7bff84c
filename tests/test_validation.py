"""Bad arguments raise at trace time with a message naming the argument."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flash

Q = jnp.zeros((2, 8, 4, 16))
K = jnp.zeros((2, 10, 2, 16))
V = jnp.zeros((2, 10, 2, 16))


def call(q=Q, k=K, v=V, **kwargs):
  return jax_flash.flash_attention(q, k, v, **kwargs)


@pytest.mark.parametrize("kwargs,error,pattern", [
    (dict(q=jnp.zeros((8, 16))), ValueError, "query must have rank"),
    (dict(q=jnp.zeros((1, 2, 8, 4, 16))), ValueError, "query must have rank"),
    (dict(k=jnp.zeros((10, 2, 16))), ValueError, "same rank"),
    (dict(k=jnp.zeros((3, 10, 2, 16))), ValueError, "same batch size"),
    (dict(v=jnp.zeros((2, 11, 2, 16))), ValueError, "key and value must have the same length"),
    (dict(v=jnp.zeros((2, 10, 1, 16))), ValueError, "same number of heads"),
    (dict(k=jnp.zeros((2, 10, 2, 8))), ValueError, "same head dim"),
    (dict(k=jnp.zeros((2, 10, 3, 16)), v=jnp.zeros((2, 10, 3, 16))), ValueError, "multiple of"),
    (dict(k=K.astype(jnp.bfloat16)), TypeError, "same dtype"),
    (dict(q=Q.astype(jnp.int32)), TypeError, "query must be float32"),
    (dict(v=np.zeros((2, 10, 2, 16), np.int8)), TypeError, "value must be float32"),
    (dict(q=jnp.zeros((2, 8, 4, 300)), k=jnp.zeros((2, 10, 2, 300))), ValueError, "head dim must be in"),
    (dict(v=jnp.zeros((2, 10, 2, 0))), ValueError, "value head dim"),
    (dict(q=jnp.zeros((2, 0, 4, 16))), ValueError, "query length"),
    (dict(q=[[1.0]]), TypeError, "query must be an array"),
    (dict(window_size=(1,)), ValueError, "window_size"),
    (dict(window_size=(-2, 0)), ValueError, "window_size entries"),
    (dict(window_size=(1.5, 0)), ValueError, "window_size"),
    (dict(softcap=-1.0), ValueError, "softcap"),
    (dict(softmax_scale=0.0), ValueError, "softmax_scale"),
    (dict(softmax_scale=float("nan")), ValueError, "softmax_scale"),
    (dict(softmax_scale="a"), TypeError, "softmax_scale"),
    (dict(dropout_rate=1.0, dropout_rng=jax.random.key(0)), ValueError, "dropout_rate must be in"),
    (dict(dropout_rate=-0.1, dropout_rng=jax.random.key(0)), ValueError, "dropout_rate must be in"),
    (dict(dropout_rate=0.1), ValueError, "dropout_rng"),
    (dict(dropout_rate=0.1, dropout_rng="seed"), TypeError, "dropout_rng"),
    (dict(alibi_slopes=jnp.zeros((3,))), ValueError, "alibi_slopes must have shape"),
    (dict(alibi_slopes=jnp.zeros((2, 4), jnp.int32)), TypeError, "alibi_slopes must be a floating"),
    (dict(segment_ids=jnp.zeros((2, 8), jnp.int32)), ValueError, "needs Sq == Sk"),
    (dict(segment_ids=(jnp.zeros((2, 8), jnp.int32), jnp.zeros((2, 9), jnp.int32))), ValueError, r"key ids\) must have shape"),
    (dict(segment_ids=(jnp.zeros((2, 8)), jnp.zeros((2, 10), jnp.int32))), TypeError, "query ids"),
    (dict(segment_ids=(jnp.zeros((2, 8), jnp.int32),)), ValueError, "pair"),
    (dict(q_seq_lengths=jnp.zeros((3,), jnp.int32)), ValueError, "q_seq_lengths must have shape"),
    (dict(kv_seq_lengths=jnp.zeros((2,))), TypeError, "kv_seq_lengths must be an integer"),
    (dict(implementation="triton"), ValueError, "implementation must be one of"),
])
def test_bad_arguments(kwargs, error, pattern):
  with pytest.raises(error, match=pattern):
    call(**kwargs)


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(k=jnp.zeros((2, 10, 3, 16)), v=jnp.zeros((2, 10, 3, 16))),
     r"query shape \(2, 8, 4, 16\).*key shape \(2, 10, 3, 16\)"),
    (dict(q=jnp.zeros((2, 8, 4, 300)), k=jnp.zeros((2, 10, 2, 300))),
     r"query head dim .* got query shape \(2, 8, 4, 300\)"),
    (dict(v=jnp.zeros((2, 10, 2, 257))),
     r"value head dim .* got value shape \(2, 10, 2, 257\)"),
    (dict(q=jnp.zeros((2, 0, 4, 16))), r"query shape \(2, 0, 4, 16\)"),
    (dict(k=K.astype(jnp.bfloat16)),
     r"query shape .*float32.*key shape \(2, 10, 2, 16\) and dtype bfloat16"),
    (dict(dropout_rate=0.25), r"dropout_rate=0.25 .*dropout_rng=None"),
    (dict(softmax_scale="a"), r"got str 'a'"),
    (dict(segment_ids=jnp.zeros((2, 8), jnp.int32)),
     r"got segment_ids of shape \(2, 8\)"),
])
def test_errors_name_the_shapes_and_values_they_got(kwargs, pattern):
  with pytest.raises((TypeError, ValueError), match=pattern):
    call(**kwargs)


def test_none_options_mean_off():
  out = call(dropout_rate=None, softcap=None, window_size=None,
             softmax_scale=None)
  assert out.shape == (2, 8, 4, 16)


def test_errors_raise_at_trace_time_under_jit():
  f = jax.jit(lambda q, k, v: jax_flash.flash_attention(q, k, v))
  with pytest.raises(ValueError, match="same head dim"):
    f(Q, jnp.zeros((2, 10, 2, 8)), V)


def test_traced_scale_is_rejected():
  f = jax.jit(lambda s: call(softmax_scale=s))
  with pytest.raises(TypeError, match="softmax_scale must be a Python float"):
    f(0.5)


def test_cuda_request_without_gpu_explains_why():
  if jax.default_backend() == "gpu":
    pytest.skip("a GPU is present")
  with pytest.raises(ValueError, match="implementation='cuda' cannot serve"):
    call(implementation="cuda")


def test_second_derivative_is_a_clear_error():
  f = lambda q: jnp.sum(jax_flash.flash_attention(q, K, V, implementation="xla"))
  g = lambda q: jnp.sum(jax.grad(f)(q) ** 2)
  with pytest.raises(jax_flash.HigherOrderDerivativeError, match="first derivatives only"):
    jax.grad(g)(Q)
  with pytest.raises(Exception, match="forward-mode|jvp"):
    jax.jvp(f, (Q,), (Q,))
