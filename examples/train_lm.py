"""Train a small GPT-style character language model with Flax NNX and optax.

    python examples/train_lm.py                    # jax_flash attention
    python examples/train_lm.py --attention xla    # Flax's default attention
    python examples/train_lm.py --attention cudnn  # jax.nn's cuDNN attention
    python examples/train_lm.py --save lm.npz      # keep the weights, then
    python examples/generate.py --checkpoint lm.npz

The corpus is examples/data/botchan.txt (public domain, see its README). The
model is a pre-LayerNorm decoder; its attention layers are either
`jax_flash.flax.nnx.FlashMultiHeadAttention` or Flax's own
`nnx.MultiHeadAttention` (with Flax's attention, or with cuDNN's through
`jax.nn.dot_product_attention(..., implementation="cudnn")`), which have the
same parameters, so every run starts from the very same weights. The script prints the loss as it falls, the
training throughput in tokens per second, the peak memory, and a short
sample decoded with the layers' key/value cache.

On a CPU the defaults are small enough to finish in a few minutes on two
cores; on a GPU they use a longer context, bfloat16 and jax_flash's CUDA
kernels.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jax_flash
from jax_flash.flax.nnx import FlashMultiHeadAttention

CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data",
                      "botchan.txt")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape of the decoder."""

  vocab_size: int
  max_len: int
  d_model: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  dtype: Any


# Command-line defaults per platform: (CPU, GPU).
DEFAULTS = {
    "steps": (400, 1000),
    "batch_size": (16, 16),
    "seq_len": (128, 2048),
    "d_model": (128, 512),
    "num_layers": (4, 8),
    "num_heads": (4, 8),
    "dtype": ("float32", "bfloat16"),
}


def cudnn_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                    bias: Optional[jax.Array] = None,
                    mask: Optional[jax.Array] = None, *,
                    is_causal: bool = False, **unused: Any) -> jax.Array:
  """A Flax `attention_fn` running cuDNN's fused attention through
  `jax.nn.dot_product_attention(..., implementation="cudnn")` (bf16/fp16 on
  an NVIDIA GPU). Training calls it with `is_causal` and no mask; decoding
  with the layer's cache passes a mask over the cache's positions, which
  runs on XLA's attention instead (sampling is not what this compares)."""
  del unused  # dropout and the rest: this model uses none of them
  if bias is None and mask is None:
    return jax.nn.dot_product_attention(query, key, value,
                                        is_causal=is_causal,
                                        implementation="cudnn")
  return jax.nn.dot_product_attention(query, key, value, bias=bias,
                                      mask=mask, is_causal=is_causal,
                                      implementation="xla")


class Block(nnx.Module):
  """Pre-LayerNorm transformer block: causal self-attention and an MLP."""

  def __init__(self, config: ModelConfig, attention: str, rngs: nnx.Rngs,
               cache_block_size: Optional[int] = None):
    d = config.d_model
    flash = attention == "flash"
    extra = {"cache_block_size": cache_block_size} if flash else {}
    if attention == "cudnn":
      extra = {"attention_fn": cudnn_attention}
    layer = FlashMultiHeadAttention if flash else nnx.MultiHeadAttention
    # jax_flash aligns the causal mask bottom-right, so it stays on while
    # decoding (several new positions at once see each other causally);
    # Flax's aligns it top-left, and its cache hides future positions of a
    # single new token by itself.
    self.causal_while_decoding = flash
    self.attention_norm = nnx.LayerNorm(d, dtype=config.dtype, rngs=rngs)
    self.attention = layer(
        config.num_heads, d, num_kv_heads=config.num_kv_heads,
        dtype=config.dtype, decode=False, rngs=rngs, **extra)
    self.mlp_norm = nnx.LayerNorm(d, dtype=config.dtype, rngs=rngs)
    self.mlp_in = nnx.Linear(d, 4 * d, dtype=config.dtype, rngs=rngs)
    self.mlp_out = nnx.Linear(4 * d, d, dtype=config.dtype, rngs=rngs)

  def __call__(self, x: jax.Array, decode: bool) -> jax.Array:
    causal = self.causal_while_decoding or not decode
    x = x + self.attention(self.attention_norm(x), is_causal=causal,
                           decode=decode)
    return x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.mlp_norm(x))))


class GPT(nnx.Module):
  """Token and position embeddings, `num_layers` blocks, a linear head."""

  def __init__(self, config: ModelConfig, attention: str, rngs: nnx.Rngs,
               cache_block_size: Optional[int] = None):
    self.token_embedding = nnx.Embed(config.vocab_size, config.d_model,
                                     dtype=config.dtype, rngs=rngs)
    self.position_embedding = nnx.Embed(config.max_len, config.d_model,
                                        dtype=config.dtype, rngs=rngs)
    self.blocks = nnx.List([Block(config, attention, rngs, cache_block_size)
                            for _ in range(config.num_layers)])
    self.final_norm = nnx.LayerNorm(config.d_model, dtype=config.dtype,
                                    rngs=rngs)
    self.head = nnx.Linear(config.d_model, config.vocab_size,
                           dtype=config.dtype, rngs=rngs)

  def __call__(self, tokens: jax.Array, positions: jax.Array,
               decode: bool = False) -> jax.Array:
    """(B, S) token ids at (S,) or (B, S) positions -> (B, S, vocab) float32
    logits."""
    x = self.token_embedding(tokens) + self.position_embedding(positions)
    for block in self.blocks:
      x = block(x, decode)
    return self.head(self.final_norm(x)).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class Corpus:
  """The text as token ids, split into training and validation parts."""

  chars: str
  train: np.ndarray
  valid: np.ndarray

  @classmethod
  def load(cls, path: str = CORPUS) -> "Corpus":
    with open(path, encoding="utf-8") as f:
      text = f.read()
    chars = "".join(sorted(set(text)))
    ids = np.frombuffer(text.encode("ascii"), np.uint8)
    lookup = np.zeros(256, np.int32)
    lookup[np.frombuffer(chars.encode("ascii"), np.uint8)] = np.arange(
        len(chars))
    ids = lookup[ids]
    split = int(0.9 * len(ids))
    return cls(chars, ids[:split], ids[split:])

  def batch(self, rng: np.random.Generator, batch_size: int, seq_len: int,
            part: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Random windows: inputs (B, S) and next-token targets (B, S)."""
    ids = self.train if part == "train" else self.valid
    starts = rng.integers(0, len(ids) - seq_len - 1, batch_size)
    windows = np.stack([ids[s:s + seq_len + 1] for s in starts])
    return windows[:, :-1], windows[:, 1:]

  def decode(self, ids: np.ndarray) -> str:
    return "".join(self.chars[i] for i in ids)


def make_loss_fn(graphdef: nnx.GraphDef) -> Callable[..., jax.Array]:
  """Mean next-token cross-entropy of the model rebuilt from its state."""

  def loss_fn(params: nnx.State, inputs: jax.Array,
              targets: jax.Array) -> jax.Array:
    model = nnx.merge(graphdef, params)
    positions = jnp.arange(inputs.shape[1])
    logits = model(inputs, positions)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, targets).mean()

  return loss_fn


def make_optimizer(learning_rate: float, steps: int
                   ) -> optax.GradientTransformation:
  """AdamW with warmup and cosine decay, gradients clipped at norm 1."""
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, learning_rate, min(100, steps // 10 + 1), max(steps, 2),
      learning_rate / 10)
  return optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(schedule, weight_decay=0.1))


def make_train_step(graphdef: nnx.GraphDef,
                    optimizer: optax.GradientTransformation
                    ) -> Callable[..., Any]:
  """(params, opt_state, inputs, targets) -> (params, opt_state, loss)."""
  loss_fn = make_loss_fn(graphdef)

  def train_step(params, opt_state, inputs, targets):
    loss, grads = jax.value_and_grad(loss_fn)(params, inputs, targets)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return train_step


def generate(model: GPT, config: ModelConfig, prompt: np.ndarray,
             length: int, seed: int) -> np.ndarray:
  """Samples `length` tokens after `prompt` with the attention cache.

  The model knows `max_len` positions: when the cache is full, a fresh one
  is filled with the last `max_len // 2` tokens and sampling goes on from
  there. Returns the sampled tokens, without the prompt.
  """
  window = config.max_len
  keep = max(1, window // 2)

  def fresh_cache() -> None:
    for block in model.blocks:
      block.attention.init_cache((1, window, config.d_model), config.dtype)

  @nnx.jit
  def next_logits(model, token, position):
    return model(token[None, None], position[None], decode=True)[0, -1]

  key = jax.random.key(seed)
  tokens = list(prompt)
  start = max(0, len(tokens) - keep)  # tokens[start] sits at position 0
  position = 0
  fresh_cache()
  while len(tokens) < len(prompt) + length:
    if position == window:
      start, position = len(tokens) - keep, 0
      fresh_cache()
    logits = next_logits(model, jnp.asarray(tokens[start + position]),
                         jnp.asarray(position))
    position += 1
    if start + position == len(tokens):  # the context is in: sample
      key, sub = jax.random.split(key)
      tokens.append(int(jax.random.categorical(sub, logits / 0.8)))
  return np.asarray(tokens[len(prompt):])


def peak_memory() -> str:
  """Peak device memory where JAX reports it, else the peak host RSS."""
  stats = jax.local_devices()[0].memory_stats()
  if stats and "peak_bytes_in_use" in stats:
    return f"{stats['peak_bytes_in_use'] / 2**20:.0f} MiB device"
  rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return f"{rss_kib / 2**10:.0f} MiB host RSS"


def make_parser() -> argparse.ArgumentParser:
  """Command-line options; defaults depend on the platform."""
  on_gpu = jax.default_backend() == "gpu"
  default = {name: values[on_gpu] for name, values in DEFAULTS.items()}
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--attention", choices=("flash", "xla", "cudnn"),
                 default="flash",
                 help="jax_flash; Flax's default dot_product_attention; or "
                 "cuDNN's through jax.nn.dot_product_attention (NVIDIA GPU, "
                 "bfloat16)")
  p.add_argument("--steps", type=int, default=default["steps"])
  p.add_argument("--batch-size", type=int, default=default["batch_size"])
  p.add_argument("--seq-len", type=int, default=default["seq_len"])
  p.add_argument("--d-model", type=int, default=default["d_model"])
  p.add_argument("--num-layers", type=int, default=default["num_layers"])
  p.add_argument("--num-heads", type=int, default=default["num_heads"])
  p.add_argument("--num-kv-heads", type=int, default=None,
                 help="fewer key/value heads for GQA (default: num-heads)")
  p.add_argument("--dtype", choices=("float32", "bfloat16"),
                 default=default["dtype"])
  p.add_argument("--learning-rate", type=float, default=3e-3)
  p.add_argument("--log-every", type=int, default=50)
  p.add_argument("--sample", type=int, default=200,
                 help="characters to generate at the end (0: none)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--save", metavar="PATH",
                 help="write the trained weights and options to PATH (.npz) "
                      "for examples/generate.py")
  return p


def build(args: argparse.Namespace, corpus: Corpus,
          cache_block_size: Optional[int] = None) -> tuple[GPT, ModelConfig]:
  """The model for these options, initialized from the seed; its attention
  layers use a paged cache of `cache_block_size` when that is set."""
  config = ModelConfig(
      vocab_size=len(corpus.chars), max_len=args.seq_len,
      d_model=args.d_model, num_layers=args.num_layers,
      num_heads=args.num_heads,
      num_kv_heads=args.num_kv_heads or args.num_heads,
      dtype=jnp.dtype(args.dtype))
  return GPT(config, args.attention, nnx.Rngs(args.seed),
             cache_block_size), config


def save_checkpoint(path: str, args: argparse.Namespace,
                    params: nnx.State) -> None:
  """The options and the weights (the leaves of `params`, in order)."""
  leaves = {f"leaf_{i}": np.asarray(x)
            for i, x in enumerate(jax.tree.leaves(params))}
  np.savez(path, options=json.dumps(vars(args)), **leaves)


def load_checkpoint(path: str) -> tuple[argparse.Namespace, list[np.ndarray]]:
  """(options, weights) written by `save_checkpoint`."""
  with np.load(path) as data:
    options = argparse.Namespace(**json.loads(str(data["options"])))
    leaves = [data[f"leaf_{i}"] for i in range(len(data.files) - 1)]
  return options, leaves


def describe(args: argparse.Namespace, params: nnx.State) -> None:
  """Prints the run's settings."""
  num_params = sum(x.size for x in jax.tree.leaves(params))
  print(f"attention={args.attention} backend={jax.default_backend()} "
        f"devices={jax.device_count()} params={num_params / 1e6:.2f}M "
        f"batch={args.batch_size} seq_len={args.seq_len} dtype={args.dtype}")
  if args.attention == "flash":
    heads = args.num_heads
    shape = (args.batch_size, args.seq_len, heads, args.d_model // heads)
    q = jax.ShapeDtypeStruct(shape, args.dtype)
    kv = jax.ShapeDtypeStruct(shape[:2] + (args.num_kv_heads or heads,)
                              + shape[3:], args.dtype)
    choice = jax_flash.explain(q, kv, kv, causal=True)
    print("jax_flash: " + ("CUDA kernels" if choice.implementation == "cuda"
                           else f"blockwise path ({choice.reason})"))


def train(args: argparse.Namespace, corpus: Corpus, step_fn: Any,
          params: nnx.State, opt_state: Any,
          place: Callable[[np.ndarray], Any] = jnp.asarray
          ) -> tuple[nnx.State, dict[str, float]]:
  """Runs `args.steps` compiled steps, printing loss and tokens per second.

  Args:
    args: the command-line options.
    corpus: the data.
    step_fn: compiled (params, opt_state, inputs, targets) -> (params,
      opt_state, loss).
    params: initial parameters; opt_state: initial optimizer state.
    place: puts a host batch on the devices.

  Returns:
    (params, numbers): the trained parameters; the first and last logged
    losses and the throughput, which leaves out the first step.
  """
  rng = np.random.default_rng(args.seed)
  tokens_per_step = args.batch_size * args.seq_len
  losses = []
  timed_steps, timed_seconds, last_logged = 0, 0.0, 0
  window_start = time.perf_counter()
  for step in range(1, args.steps + 1):
    inputs, targets = corpus.batch(rng, args.batch_size, args.seq_len)
    params, opt_state, loss = step_fn(params, opt_state, place(inputs),
                                      place(targets))
    if step == 1 or step % args.log_every == 0 or step == args.steps:
      loss = float(loss)
      losses.append(loss)
      now = time.perf_counter()
      line = f"step {step:5d}  loss {loss:.3f}"
      if step > 1:
        steps_in_window = step - last_logged
        timed_steps += steps_in_window
        timed_seconds += now - window_start
        rate = steps_in_window * tokens_per_step / (now - window_start)
        line += f"  {rate:,.0f} tokens/s"
      print(line)
      last_logged = step
      window_start = time.perf_counter()
  throughput = (timed_steps * tokens_per_step / timed_seconds
                if timed_seconds else float("nan"))
  return params, {"first_loss": losses[0], "final_loss": losses[-1],
                  "tokens_per_s": throughput}


def main(argv: Optional[list[str]] = None) -> dict[str, float]:
  """Trains, evaluates and samples; returns the measured numbers."""
  args = make_parser().parse_args(argv)
  if args.attention == "cudnn" and (jax.default_backend() != "gpu"
                                    or args.dtype != "bfloat16"):
    raise SystemExit(
        "--attention cudnn needs an NVIDIA GPU and --dtype bfloat16 "
        "(cuDNN's fused attention); this run has backend="
        f"{jax.default_backend()} and --dtype {args.dtype}")
  corpus = Corpus.load()
  model, config = build(args, corpus)
  graphdef, params = nnx.split(model)
  optimizer = make_optimizer(args.learning_rate, args.steps)
  opt_state = optimizer.init(params)
  describe(args, params)
  example = corpus.batch(np.random.default_rng(0), args.batch_size,
                         args.seq_len)
  compiled = jax.jit(make_train_step(graphdef, optimizer),
                     donate_argnums=(0, 1)).lower(params, opt_state,
                                                  *example).compile()
  analysis = compiled.memory_analysis()
  step_temp_mib = (analysis.temp_size_in_bytes / 2**20
                   if analysis is not None else float("nan"))

  params, result = train(args, corpus, compiled, params, opt_state)

  eval_loss = jax.jit(make_loss_fn(graphdef))
  rng = np.random.default_rng(args.seed + 1)
  result["valid_loss"] = float(np.mean([
      eval_loss(params, *corpus.batch(rng, args.batch_size, args.seq_len,
                                      "valid")) for _ in range(4)]))
  result["step_temp_mib"] = step_temp_mib
  print(f"validation loss {result['valid_loss']:.3f}; training throughput "
        f"{result['tokens_per_s']:,.0f} tokens/s; peak memory "
        f"{peak_memory()}; XLA temporaries per step {step_temp_mib:.1f} MiB")

  if args.save:
    save_checkpoint(args.save, args, params)
    print(f"saved the weights to {args.save}")
  if args.sample > 0:
    model = nnx.merge(graphdef, params)
    prompt = corpus.valid[:16]
    text = corpus.decode(generate(model, config, prompt, args.sample,
                                  args.seed))
    print(f"prompt ({len(prompt)} characters of the validation text):\n"
          f"{corpus.decode(prompt)}\n"
          f"sample ({len(text)} characters generated after the prompt):\n"
          f"{text}")
  return result


if __name__ == "__main__":
  main()
