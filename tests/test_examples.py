"""A few training steps of each example, at tiny sizes."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "examples")
TINY = ["--steps", "8", "--log-every", "4", "--batch-size", "8",
        "--seq-len", "32", "--d-model", "32", "--num-layers", "1",
        "--num-heads", "4", "--dtype", "float32"]


@pytest.fixture(scope="module")
def train_lm():
  sys.path.insert(0, EXAMPLES)
  try:
    import train_lm
    yield train_lm
  finally:
    sys.path.remove(EXAMPLES)


def test_train_lm_loss_falls_from_the_same_start(train_lm, capsys):
  gqa = ["--num-kv-heads", "2"]
  flash = train_lm.main(TINY + gqa + ["--attention", "flash", "--sample", "8"])
  xla = train_lm.main(TINY + gqa + ["--attention", "xla", "--sample", "0"])
  printed = capsys.readouterr().out
  assert "tokens/s" in printed and "peak memory" in printed
  assert "sample (8 characters generated after the prompt):" in printed
  for result in (flash, xla):
    assert result["final_loss"] < result["first_loss"] - 0.1
    assert math.isfinite(result["valid_loss"])
    assert result["tokens_per_s"] > 0
  # Both attention layers have the same parameters, hence the same start.
  assert abs(xla["first_loss"] - flash["first_loss"]) < 1e-4


@pytest.mark.skipif(jax.default_backend() == "gpu",
                    reason="checks the message a CPU run gets")
def test_cudnn_attention_needs_a_gpu_and_says_so(train_lm):
  with pytest.raises(SystemExit, match="--attention cudnn needs an NVIDIA GPU"):
    train_lm.main(TINY + ["--attention", "cudnn"])


def test_sample_is_as_long_as_asked_past_the_context(train_lm):
  args = train_lm.make_parser().parse_args(TINY + ["--seq-len", "8"])
  corpus = train_lm.Corpus.load()
  model, config = train_lm.build(args, corpus)
  sample = train_lm.generate(model, config, corpus.valid[:5], 21, seed=0)
  assert sample.shape == (21,)
  assert 0 <= sample.min() and sample.max() < len(corpus.chars)


def run_on_8_host_devices(module: str, call: str, mesh: str):
  """Runs `print('RESULT', json.dumps(<call>))` after importing the example
  `module` in a fresh Python with 8 CPU devices, checks the mesh it printed,
  and returns the result."""
  script = (f"import json, {module}\n"
            f"print('RESULT', json.dumps({call}))\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run([sys.executable, "-c", script], cwd=EXAMPLES,
                        env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"mesh: {mesh} over 8 cpu devices" in proc.stdout
  line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT"))
  return json.loads(line.split(" ", 1)[1])


def test_sharded_training_attention_adds_no_collective():
  args = TINY + ["--steps", "3"]
  runs = run_on_8_host_devices(
      "sharded_training",
      f"{{a: sharded_training.main({args!r} + ['--attention', a]) "
      "for a in ('flash', 'xla')}", "{'data': 4, 'model': 2}")
  flash, xla = runs["flash"], runs["xla"]
  assert flash["attention_collectives"] == {}
  # The data-parallel gradient all-reduce is there, and attention changes
  # nothing about the step's collectives.
  assert flash["step_collectives"].get("all-reduce", 0) > 0
  assert flash["step_collectives"] == xla["step_collectives"]
  assert math.isfinite(flash["final_loss"])


def test_long_context_trains_with_the_sequence_on_a_ring():
  run = run_on_8_host_devices("long_context", f"long_context.main({TINY!r})",
                              "{'seq': 8}")
  # K/V go around the ring; nothing gathers the sequence.
  assert run["step_collectives"].get("collective-permute", 0) > 0
  assert "all-gather" not in run["step_collectives"]
  assert run["final_loss"] < run["first_loss"] - 0.1


@pytest.fixture(scope="module")
def generate(train_lm):
  import generate
  return generate


def test_generate_from_a_saved_model(train_lm, generate, tmp_path, capsys):
  path = str(tmp_path / "lm.npz")
  train_lm.main(TINY + ["--sample", "0", "--save", path])
  result = generate.main(["--checkpoint", path, "--batch-size", "3",
                          "--new-tokens", "5", "--max-prompt", "20"])
  printed = capsys.readouterr().out
  assert "tokens/s" in printed and "cache pool" in printed
  assert result["new_tokens"] == 5 and result["tokens_per_s"] > 0
  assert len(result["texts"]) == 3


def test_paged_decoding_gives_the_full_forward_logits(train_lm, generate):
  args = generate.make_parser().parse_args(["--random-init",
                                            "--block-size", "16"])
  corpus = train_lm.Corpus.load()
  model, config = generate.load_model(args, corpus)
  lengths = np.array([5, 17, 11])
  tokens = jnp.asarray(corpus.valid[:3 * 24].reshape(3, 24))
  table, num_blocks = generate.allocate_blocks(lengths + 4, 16)
  for block in model.blocks:
    block.attention.init_cache((3, table.shape[1] * 16, config.d_model),
                               num_blocks=num_blocks,
                               block_table=jnp.asarray(table))
  n = jnp.asarray(lengths, jnp.int32)
  got = [generate.prefill(model, tokens[:, :17], n - 1)]
  generate.set_cache_lengths(model, n)
  for step in range(3):
    token = jnp.take_along_axis(tokens, n[:, None] + step, axis=1)[:, 0]
    got.append(generate.decode_step(model, token, n + step))
  full = model(tokens, jnp.arange(24))  # no cache: plain causal attention
  for step, logits in enumerate(got):
    want = jnp.take_along_axis(full, (n - 1 + step)[:, None, None], axis=1)
    np.testing.assert_allclose(logits, want[:, 0], atol=2e-4, rtol=2e-4)
