"""The blockwise path against the float32 reference: values and gradients."""

import functools

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_qkv
from jax_flash.blockwise import blockwise_attention
from jax_flash.config import AttentionConfig
from numerics import check_against_reference, make_masks

# (B, Sq, Sk, H, Hkv, D, Dv): awkward lengths, Sq != Sk both ways, GQA 1/2/8.
SHAPES = [
    (1, 1, 1, 1, 1, 8, 8),
    (2, 7, 113, 4, 2, 40, 40),
    (1, 113, 7, 8, 1, 64, 32),
    (2, 257, 257, 2, 2, 128, 128),
    (1, 1, 1000, 8, 8, 256, 256),
    (1, 77, 300, 8, 1, 96, 64),
]

MASKS = {
    "none": ({}, {}),
    "causal": (dict(causal=True), {}),
    "window": (dict(window_left=16, window_right=3), {}),
    "causal_window": (dict(causal=True, window_left=9), {}),
    "softcap": (dict(softcap=2.5), {}),
    "alibi": ({}, dict(alibi=True)),
    "segments": ({}, dict(segments=True)),
    "lengths_causal": (dict(causal=True), dict(lengths=True)),
    "everything": (dict(causal=True, window_left=40, softcap=4.0),
                   dict(alibi=True, segments=True, lengths=True)),
    "dropout": (dict(dropout_rate=0.25), dict(dropout=True)),
}

small_blocks = functools.partial(blockwise_attention, block_q=32, block_k=64)


def _case(shape, options, mask_parts, dtype, attend, seed):
  b, sq, sk, h, hkv, d, dv = shape
  q, k, v = random_qkv(seed, b, sq, sk, h, hkv, d, dv, dtype)
  config = AttentionConfig(softmax_scale=d**-0.5, **options)
  masks = make_masks(np.random.default_rng(seed), b, sq, sk, h, **mask_parts)
  check_against_reference(attend, q, k, v, config, masks, seed)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_shapes(shape, causal):
  _case(shape, dict(causal=causal), {}, jnp.float32, small_blocks, 0)


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("shape", [(2, 57, 150, 4, 2, 32, 32),
                                   (2, 150, 57, 4, 4, 32, 16)], ids=str)
def test_masks(shape, mask):
  options, parts = MASKS[mask]
  _case(shape, options, parts, jnp.float32, small_blocks, 1)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=str)
@pytest.mark.parametrize("mask", ["none", "causal", "everything"])
def test_low_precision(dtype, mask):
  options, parts = MASKS[mask]
  _case((2, 100, 131, 4, 2, 64, 64), options, parts, dtype, small_blocks, 2)


@pytest.mark.parametrize("mask", ["none", "causal"])
def test_default_blocks_long(mask):
  # Lengths that are not multiples of the default 512 tiles.
  options, parts = MASKS[mask]
  _case((1, 1000, 1100, 2, 1, 64, 64), options, parts, jnp.float32,
        blockwise_attention, 3)
