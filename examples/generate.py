"""Sample from the character model of train_lm.py with a paged K/V cache.

    python examples/train_lm.py --save lm.npz
    python examples/generate.py --checkpoint lm.npz
    python examples/generate.py --random-init      # no training needed

A batch of prompts of different lengths (windows of the validation text)
shares one pool of cache blocks: each row gets the blocks its prompt and
continuation need, and its unused table entries are -1 (no block). The
prompts are prefilled in one call, padded to the longest; each row's cache
length is then set back to its prompt's, so the padding is masked and later
overwritten (tokens that would land in a row's missing blocks are dropped).
Every following step appends one token per row at that row's own position
through `jax_flash.flash_attention_with_kv_cache`. The script prints the
samples and the decoding throughput in tokens per second.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_lm  # noqa: E402  pylint: disable=wrong-import-position


def make_parser() -> argparse.ArgumentParser:
  """Command-line options."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  source = p.add_mutually_exclusive_group(required=True)
  source.add_argument("--checkpoint", metavar="PATH",
                      help="weights saved by train_lm.py --save")
  source.add_argument("--random-init", action="store_true",
                      help="a randomly initialized model of train_lm.py's "
                           "default shape (for a quick run)")
  p.add_argument("--batch-size", type=int, default=4,
                 help="number of prompts")
  p.add_argument("--min-prompt", type=int, default=8)
  p.add_argument("--max-prompt", type=int, default=40)
  p.add_argument("--new-tokens", type=int, default=48)
  p.add_argument("--block-size", type=int, default=16,
                 help="positions per cache block (a multiple of 16)")
  p.add_argument("--temperature", type=float, default=0.8)
  p.add_argument("--seed", type=int, default=0)
  return p


def load_model(args: argparse.Namespace, corpus: train_lm.Corpus
               ) -> tuple[train_lm.GPT, train_lm.ModelConfig]:
  """The model of the checkpoint, or a fresh one, with paged caches."""
  if args.random_init:
    options = train_lm.make_parser().parse_args(["--seed", str(args.seed)])
    return train_lm.build(options, corpus, args.block_size)
  options, leaves = train_lm.load_checkpoint(args.checkpoint)
  options.attention = "flash"
  model, config = train_lm.build(options, corpus, args.block_size)
  graphdef, state = nnx.split(model)
  state = jax.tree.unflatten(jax.tree.structure(state),
                             [jnp.asarray(x) for x in leaves])
  return nnx.merge(graphdef, state), config


def allocate_blocks(needed: np.ndarray, block_size: int
                    ) -> tuple[np.ndarray, int]:
  """A block table giving row r ceil(needed[r] / block_size) blocks.

  Returns:
    (table (rows, max_blocks) int32 with -1 past each row's blocks, the
    number of blocks in the pool).
  """
  counts = -(-needed // block_size)
  table = np.full((len(needed), int(counts.max())), -1, np.int32)
  first = np.concatenate([[0], np.cumsum(counts)[:-1]])
  for row, (start, count) in enumerate(zip(first, counts)):
    table[row, :count] = np.arange(start, start + count)
  return table, int(counts.sum())


def set_cache_lengths(model: train_lm.GPT, lengths: jax.Array) -> None:
  """Every layer's rows continue from `lengths`."""
  for block in model.blocks:
    block.attention.cache_index[...] = lengths


@nnx.jit
def prefill(model: train_lm.GPT, tokens: jax.Array, last: jax.Array
            ) -> jax.Array:
  """Writes the (B, P) padded prompts to the cache; (B, vocab) logits of
  each row's last prompt token (at index `last`)."""
  positions = jnp.arange(tokens.shape[1])
  logits = model(tokens, positions, decode=True)
  return jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]


@nnx.jit
def decode_step(model: train_lm.GPT, tokens: jax.Array,
                positions: jax.Array) -> jax.Array:
  """One new token per row at its own position: (B, vocab) logits."""
  return model(tokens[:, None], positions[:, None], decode=True)[:, 0]


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
  """Samples a continuation of each prompt; returns texts and throughput."""
  args = make_parser().parse_args(argv)
  corpus = train_lm.Corpus.load()
  model, config = load_model(args, corpus)
  rng = np.random.default_rng(args.seed)
  prompt_lens = rng.integers(args.min_prompt, args.max_prompt + 1,
                             args.batch_size)
  new_tokens = min(args.new_tokens, config.max_len - int(prompt_lens.max()))
  starts = rng.integers(0, len(corpus.valid) - args.max_prompt,
                        args.batch_size)
  prompts = np.zeros((args.batch_size, int(prompt_lens.max())), np.int32)
  for row, (start, n) in enumerate(zip(starts, prompt_lens)):
    prompts[row, :n] = corpus.valid[start:start + n]

  table, num_blocks = allocate_blocks(prompt_lens + new_tokens,
                                      args.block_size)
  capacity = table.shape[1] * args.block_size
  for block in model.blocks:
    block.attention.init_cache((args.batch_size, capacity, config.d_model),
                               config.dtype, num_blocks=num_blocks,
                               block_table=jnp.asarray(table))
  print(f"{args.batch_size} prompts of {prompt_lens.tolist()} characters, "
        f"{new_tokens} new each; cache pool of {num_blocks} blocks of "
        f"{args.block_size} (a contiguous cache would take "
        f"{table.size}); backend {jax.default_backend()}")

  key = jax.random.key(args.seed)
  lengths = jnp.asarray(prompt_lens, jnp.int32)
  logits = prefill(model, jnp.asarray(prompts), lengths - 1)
  set_cache_lengths(model, lengths)
  generated = []
  start = None
  for step in range(new_tokens):
    key, sub = jax.random.split(key)
    token = jax.random.categorical(sub, logits / args.temperature)
    generated.append(token)
    if step == 1:  # the first step compiled: time the rest
      jax.block_until_ready(token)
      start = time.perf_counter()
    if step + 1 < new_tokens:
      logits = decode_step(model, token, lengths + step)
  tokens = np.asarray(jnp.stack(generated, axis=1))
  seconds = time.perf_counter() - start if start is not None else 0.0
  timed = args.batch_size * (new_tokens - 2)
  rate = timed / seconds if seconds > 0 and timed > 0 else float("nan")
  texts = []
  for row in range(args.batch_size):
    prompt = corpus.decode(prompts[row, :prompt_lens[row]])
    texts.append(prompt + corpus.decode(tokens[row]))
    print(f"--- {prompt!r} -> {corpus.decode(tokens[row])!r}")
  print(f"decoding: {rate:,.0f} tokens/s ({args.batch_size} rows)")
  return {"texts": texts, "tokens_per_s": rate, "new_tokens": new_tokens,
          "num_blocks": num_blocks}


if __name__ == "__main__":
  main()
