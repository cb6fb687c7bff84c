"""The CUDA path's JAX plumbing, checked on CPU without the compiled library.

Programs are lowered for the "cuda" platform and their custom calls counted.
To run the sharding and batching rules, the primitives also get a CPU
lowering whose per-shard function is the reference attention: XLA then
partitions and runs them on the 8 fake devices of conftest.py.
"""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import random_qkv
from jax_flash import cuda
from jax_flash.config import AttentionConfig, MaskArrays
from jax_flash.cuda import library, lowering, partitioning, primitives
from jax_flash.reference import reference_attention

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIG = AttentionConfig(softmax_scale=0.125, causal=True, softcap=20.0)
on_cpu = pytest.mark.skipif(
    jax.default_backend() != "cpu",
    reason="runs the primitives on the CPU backend (JAX_PLATFORMS=cpu)")
COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute",
               "reduce-scatter")


@pytest.fixture(autouse=True)
def without_library(monkeypatch):
  """The same view with or without a built library: every contract head dim
  counts as compiled, and the forward's and backward's scratch sizes (which
  normally come from the library) are fixed."""
  monkeypatch.setattr(library, "_load", lambda: "not loaded in these tests")
  monkeypatch.setattr(library, "fwd_workspace_bytes", lambda: 16)
  monkeypatch.setattr(library, "bwd_workspace_bytes", lambda *shape: 256)


def _custom_calls(fn, *args):
  """{target: count} of the custom calls of jit(fn) lowered for CUDA."""
  text = jax.jit(fn).trace(*args).lower(
      lowering_platforms=("cuda",)).as_text()
  targets = re.findall(r"custom_call @(\w+)\(", text)
  return {t: targets.count(t) for t in set(targets)}, text


def _inputs(d=40, dv=None, batch=2, heads=4, kv_heads=2, dtype=jnp.bfloat16):
  return random_qkv(0, batch, 17, 33, heads, kv_heads, d, dv, dtype)


def _attend(config=CONFIG, masks=MaskArrays()):
  return lambda q, k, v: cuda.attention(q, k, v, config, masks)


def _loss(attend, with_lse=False):
  def loss(q, k, v):
    out, lse = attend(q, k, v)
    total = jnp.sum(out.astype(jnp.float32))
    return total + jnp.sum(lse) if with_lse else total
  return loss


def _handler_names(source):
  """{kind: names} of the FFI handler in csrc/ffi/<source>: from its Bind()
  chain (the comment after each .Arg/.Ret names it), and the parameters of
  the function it binds, which must agree."""
  text = (ROOT / "csrc" / "ffi" / source).read_text()
  chain = text[text.index("ffi::Ffi::Bind()"):text.index("{ffi::Traits")]
  names = {"operand": re.findall(r"\.Arg<.*?//\s*(\w+)", chain),
           "result": re.findall(r"\.Ret<.*?//\s*(\w+)", chain),
           "attribute": re.findall(r'\.Attr<\w+>\("(\w+)"\)', chain)}
  impl = re.search(r"XLA_FFI_DEFINE_HANDLER_SYMBOL\(\s*\w+,\s*[\w:]*?(\w+),",
                   text).group(1)
  params = re.search(impl + r"\((.*?)\)\s*\{", text, re.S).group(1)
  bound = [p.split()[-1] for p in params.split(",")][1:]  # after the stream
  assert bound == sum(names.values(), []), (source, bound)
  return names


def _contract_names(target):
  """{kind: names} of the table under `target` in docs/ffi_contract.md."""
  text = (ROOT / "docs" / "ffi_contract.md").read_text()
  section = text[text.index(f"## `{target}`"):]
  section = section[:section.index("\n## ", 1)]
  names = {"operand": [], "result": [], "attribute": []}
  for kind, name in re.findall(r"^\| (operand|result|attribute) \| (\w+) \|",
                               section, re.M):
    names[kind].append(name)
  return names


@pytest.mark.parametrize("call,source", [(lowering.FORWARD, "ffi_fwd.cu"),
                                         (lowering.BACKWARD, "ffi_bwd.cu"),
                                         (lowering.DECODE, "ffi_decode.cu")])
def test_one_operand_list_for_handlers_lowering_and_docs(call, source):
  python = {"operand": list(call.operands) + [n for n, _ in call.optional],
            "result": list(call.results),
            "attribute": list(call.attributes)}
  assert _handler_names(source) == python
  assert _contract_names(call.target) == python


def test_forward_is_one_custom_call_with_contract_operands():
  q, k, v = _inputs(d=40, dv=24)
  masks = MaskArrays(kv_lengths=jnp.array([5, 33], jnp.int32))
  calls, text = _custom_calls(_attend(masks=masks), q, k, v)
  assert calls == {"jax_flash_fwd": 1}
  call = re.search(r"custom_call @jax_flash_fwd\(.*", text).group(0)
  # Head dims 40 and 24 run padded to 64; absent masks are (0,) operands.
  assert ("(tensor<2x17x4x64xbf16>, tensor<2x33x2x64xbf16>, "
          "tensor<2x33x2x64xbf16>, tensor<0xf32>, tensor<0xi32>, "
          "tensor<0xi32>, tensor<0xi32>, tensor<2xi32>, tensor<0xi32>)") in call
  # Results: out, lse and the forward's scratch bytes.
  assert ("-> (tensor<2x17x4x64xbf16>, tensor<2x4x17xf32>, "
          "tensor<16xui8>)") in call
  for attr in ("softcap = 2.000000e+01 : f32", "softmax_scale = 1.250000e-01",
               "window_left = -1 : i32", "window_right = 0 : i32",
               "kernel_arch = 80 : i32"):
    assert attr in call


@pytest.mark.parametrize("with_lse", [False, True])
def test_gradient_is_one_forward_and_one_backward_call(with_lse):
  q, k, v = _inputs(d=64)
  calls, text = _custom_calls(
      jax.grad(_loss(_attend(), with_lse), argnums=(0, 1, 2)), q, k, v)
  assert calls == {"jax_flash_fwd": 1, "jax_flash_bwd": 1}
  call = re.search(r"custom_call @jax_flash_bwd\(.*", text).group(0)
  assert "deterministic = false" in call
  # lse's cotangent is the last operand when lse is used, else (0,).
  operands = call.split(" -> ")[0]
  dlse = "tensor<2x4x17xf32>" if with_lse else "tensor<0xf32>"
  assert operands.endswith(f"tensor<0xi32>, {dlse})"), operands


def test_ring_attention_entry_points_are_single_calls():
  q, k, v = _inputs(d=64)

  def forward_then_backward(q, k, v):
    out, lse = cuda.attention_forward(q, k, v, CONFIG, MaskArrays())
    return cuda.attention_backward(q, k, v, out, lse, jnp.ones_like(out),
                                   CONFIG, MaskArrays())

  calls, _ = _custom_calls(forward_then_backward, q, k, v)
  assert calls == {"jax_flash_fwd": 1, "jax_flash_bwd": 1}


def test_lse_gradient_at_the_largest_head_dim_is_one_backward_call():
  q, k, v = _inputs(d=256)
  calls, _ = _custom_calls(
      jax.grad(_loss(_attend(), with_lse=True), argnums=(0, 1, 2)), q, k, v)
  assert calls == {"jax_flash_fwd": 1, "jax_flash_bwd": 1}


def test_alibi_gradient_comes_from_the_backward_call():
  q, k, v = _inputs(d=64)
  slopes = jnp.full((2, 4), 0.5, jnp.float32)

  def loss(slopes):
    out, _ = cuda.attention(q, k, v, CONFIG, MaskArrays(alibi_slopes=slopes))
    return jnp.sum(out.astype(jnp.float32))

  calls, text = _custom_calls(jax.grad(loss), slopes)
  assert calls == {"jax_flash_fwd": 1, "jax_flash_bwd": 1}
  call = re.search(r"custom_call @jax_flash_bwd\(.*", text).group(0)
  assert "tensor<2x4xf32>, tensor<256xui8>)" in call

  def loss_with_lse(slopes):
    out, lse = cuda.attention(q, k, v, CONFIG, MaskArrays(alibi_slopes=slopes))
    return jnp.sum(out.astype(jnp.float32)) + jnp.sum(lse)

  calls, _ = _custom_calls(jax.grad(loss_with_lse), slopes)
  assert calls == {"jax_flash_fwd": 1, "jax_flash_bwd": 1}


def test_position_offsets_are_one_operand_per_batch_row():
  """q_offset - kv_offset reaches both calls as one (B,) int32 operand after
  kv_lengths, from traced offsets (a ring step's depend on the shard index),
  and a vmapped call folds it into the batch like every other operand."""
  q, k, v = _inputs(d=64)

  def loss(q, k, v, q_offset):
    masks = MaskArrays(q_offset=q_offset, kv_offset=jnp.int32(5))
    out, lse = cuda.attention(q, k, v, CONFIG, masks)
    return jnp.sum(out.astype(jnp.float32)) + jnp.sum(lse)

  grads = jax.grad(loss, argnums=(0, 1, 2))
  calls, text = _custom_calls(grads, q, k, v, jnp.int32(12))
  assert calls == {"jax_flash_fwd": 1, "jax_flash_bwd": 1}
  forward = re.search(r"custom_call @jax_flash_fwd\((.*)", text).group(1)
  assert forward.split(" -> ")[0].endswith("tensor<0xi32>, tensor<2xi32>)")
  backward = re.search(r"custom_call @jax_flash_bwd\((.*)", text).group(1)
  assert backward.split(" -> ")[0].endswith(
      "tensor<0xi32>, tensor<2xi32>, tensor<2x4x17xf32>)")

  batched = jax.vmap(grads, in_axes=(0, None, None, 0))
  calls, text = _custom_calls(batched, jnp.stack([q, q, q]), k, v,
                              jnp.arange(3, dtype=jnp.int32))
  assert calls == {"jax_flash_fwd": 1, "jax_flash_bwd": 1}
  forward = re.search(r"custom_call @jax_flash_fwd\((.*)", text).group(1)
  assert forward.split(" -> ")[0].endswith("tensor<0xi32>, tensor<6xi32>)")


def test_vmap_over_several_axes_is_one_call():
  q, k, v = _inputs(d=64)
  qs = jnp.stack([q, q, q], axis=2)          # vmapped at axis 2
  vs = jnp.stack([v, v, v], axis=4)          # vmapped at axis 4
  lengths = jnp.array([[3, 9], [17, 1], [0, 2]], jnp.int32).T  # axis 1

  def one(q, k, v, q_lengths):
    return cuda.attention(q, k, v, CONFIG, MaskArrays(q_lengths=q_lengths))

  batched = jax.vmap(one, in_axes=(2, None, 4, 1))
  calls, text = _custom_calls(batched, qs, k, vs, lengths)
  assert calls == {"jax_flash_fwd": 1}
  # Three vmapped copies of batch 2 run as one batch of 6.
  assert "tensor<6x17x4x64xbf16>, tensor<6x33x2x64xbf16>" in text

  def loss(q, k, v, q_lengths):
    return jnp.sum(batched(q, k, v, q_lengths)[0].astype(jnp.float32))

  calls, _ = _custom_calls(jax.vmap(jax.grad(loss, argnums=(0, 1, 2)),
                                    in_axes=(0, None, None, None)),
                           jnp.stack([qs, qs]), k, vs, lengths)
  assert calls == {"jax_flash_fwd": 1, "jax_flash_bwd": 1}


@on_cpu
def test_cpu_reports_unavailable_and_registers_nothing(monkeypatch):
  monkeypatch.undo()     # the real library, if one was built here
  cuda.unavailable_reason.cache_clear()
  reason = cuda.unavailable_reason()
  assert reason is not None
  assert ("does not exist" in reason or "backend is cpu" in reason), reason
  assert library.register_targets.cache_info().currsize == 0


def test_unsupported_reasons_name_the_argument():
  q, k, v = _inputs(d=64)
  assert cuda.unsupported_reason(q, k, v, CONFIG, MaskArrays()) is None
  dropout = AttentionConfig(softmax_scale=1.0, dropout_rate=0.1)
  assert cuda.unsupported_reason(q, k, v, dropout, MaskArrays()) == (
      "dropout_rate > 0")
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  assert cuda.unsupported_reason(*f32, CONFIG, MaskArrays()) == (
      "float32 inputs")


def test_build_info_parsing_and_head_dims(monkeypatch):
  info = library.BuildInfo.parse(
      "sm80:fwd:bf16:128;sm80:bwd:bf16:128;sm80:fwd:bf16:64;sm80:fwd:fp16:96;"
      "sm80:bwd:fp16:96|archs=80,90")
  assert info.head_dims("bf16") == (128,)       # 64 lacks a backward
  assert info.head_dims("fp16") == (96,)
  assert info.runs_on(86) and info.runs_on(90) and not info.runs_on(75)
  # Later GPUs run the embedded PTX of the newest arch; earlier ones nothing.
  assert library.BuildInfo.parse("sm80:fwd:bf16:64|archs=90").runs_on(100)
  assert not library.BuildInfo.parse("sm80:fwd:bf16:64|archs=90").runs_on(89)
  with pytest.raises(ValueError, match="rebuild"):
    library.BuildInfo.parse("fwd:bf16:128|archs=80")
  loaded = library.Library(library.library_path(), None, info)
  monkeypatch.setattr(library, "_load", lambda: loaded)
  assert library.kernel_head_dim("bf16", 40) == 128
  assert cuda.unsupported_reason(*_inputs(d=40, dv=8), CONFIG,
                                 MaskArrays()) is None
  big = _inputs(d=160)
  assert cuda.unsupported_reason(*big, CONFIG, MaskArrays()) == (
      "head dim 160 not compiled in this build (bf16)")


class _FakeGpu:
  def __init__(self, capability):
    self.compute_capability = capability


def _on_gpu(monkeypatch, capability):
  """The default device, as kernel_arch sees it, is a GPU of `capability`."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(jax, "devices", lambda: [_FakeGpu(capability)])


def _with_build(monkeypatch, text):
  info = library.BuildInfo.parse(text)
  monkeypatch.setattr(library, "_load",
                      lambda: library.Library(library.library_path(), None,
                                              info))


SM90_FWD_128 = ("sm80:fwd:bf16:64;sm80:bwd:bf16:64;sm80:fwd:bf16:128;"
                "sm80:bwd:bf16:128;sm90:fwd:bf16:128|archs=80,90")


@pytest.mark.parametrize("capability,want", [("9.0", 90), ("8.0", 80),
                                             ("10.0", 80)])
def test_sm90_kernels_run_on_compute_capability_9(monkeypatch, capability,
                                                  want):
  monkeypatch.setattr(library, "DEFAULT_SM90_DIRECTIONS", frozenset({"fwd"}))
  _with_build(monkeypatch, SM90_FWD_128)
  _on_gpu(monkeypatch, capability)
  assert library.kernel_arch("fwd", "bf16", 128) == want
  assert library.kernel_arch("bwd", "bf16", 128) == 80


def test_sm80_kernel_on_sm90_is_logged_once_with_its_reason(monkeypatch,
                                                            caplog):
  _with_build(monkeypatch, SM90_FWD_128)
  _on_gpu(monkeypatch, "9.0")
  monkeypatch.setattr(library, "_logged_arch_choices", set())
  for _ in range(2):
    assert library.kernel_arch("fwd", "bf16", 64) == 80
  reasons = [r.getMessage() for r in caplog.records]
  assert reasons == ["jax_flash: running the sm80 kernel on sm_90: no sm90 "
                     "fwd kernel is built for bf16 at head dim 64"]


def test_sm90_forward_and_backward_run_by_default_on_sm90(monkeypatch):
  _with_build(monkeypatch, SM90_FWD_128.replace(
      "|", ";sm90:bwd:bf16:128|"))
  _on_gpu(monkeypatch, "9.0")
  assert library.DEFAULT_SM90_DIRECTIONS == frozenset({"fwd", "bwd"})
  assert library.kernel_arch("fwd", "bf16", 128) == 90
  assert library.kernel_arch("bwd", "bf16", 128) == 90
  # The sm90 backward is built for some head dims only: sm80 for the rest.
  assert library.kernel_arch("bwd", "bf16", 64) == 80


def test_opt_in_sm90_kernels_run_only_when_asked(monkeypatch, caplog):
  _with_build(monkeypatch, SM90_FWD_128)
  _on_gpu(monkeypatch, "9.0")
  monkeypatch.setattr(library, "DEFAULT_SM90_DIRECTIONS", frozenset())
  monkeypatch.setattr(library, "_logged_arch_choices", set())
  assert library.kernel_arch("fwd", "bf16", 128) == 80
  assert "still opt-in" in caplog.records[-1].getMessage()
  monkeypatch.setenv(library.FORCE_ARCH_ENV_VAR, "sm90")
  assert library.kernel_arch("fwd", "bf16", 128) == 90


def test_only_sm80_built_logs_nothing_on_sm90(monkeypatch, caplog):
  _with_build(monkeypatch, "sm80:fwd:bf16:128;sm80:bwd:bf16:128|archs=80,90")
  _on_gpu(monkeypatch, "9.0")
  assert library.kernel_arch("fwd", "bf16", 128) == 80
  assert not caplog.records


def test_forcing_an_arch(monkeypatch):
  _with_build(monkeypatch, SM90_FWD_128)
  _on_gpu(monkeypatch, "9.0")
  monkeypatch.setenv(library.FORCE_ARCH_ENV_VAR, "sm80")
  assert library.kernel_arch("fwd", "bf16", 128) == 80
  # sm90 wherever an sm90 kernel is built, sm80 for the rest.
  monkeypatch.setenv(library.FORCE_ARCH_ENV_VAR, "sm90")
  assert library.kernel_head_dim("bf16", 64) == 64
  assert library.kernel_arch("fwd", "bf16", 128) == 90
  assert library.kernel_arch("bwd", "bf16", 128) == 80
  assert library.kernel_arch("fwd", "bf16", 64) == 80
  monkeypatch.setenv(library.FORCE_ARCH_ENV_VAR, "sm75")
  with pytest.raises(ValueError, match="JAX_FLASH_FORCE_ARCH"):
    library.kernel_arch("fwd", "bf16", 128)


# ---- Running the rules on CPU, with the reference computing each shard ----

SEEN_SHAPES = []


def _reference_forward(q, k, v, *masks, config, mask_names):
  SEEN_SHAPES.append(q.shape)
  return reference_attention(q, k, v, config,
                             MaskArrays(**dict(zip(mask_names, masks))))


def _reference_backward(q, k, v, out, dout, lse, *masks, config, mask_names):
  del out
  given = dict(zip(mask_names, masks))
  slopes = given.pop("alibi_slopes", None)
  dlse = given.pop("dlse", jnp.zeros_like(lse))

  def attend(q, k, v, slopes):
    return reference_attention(q, k, v, config,
                               MaskArrays(alibi_slopes=slopes, **given))

  _, vjp = jax.vjp(attend, q, k, v, slopes)
  grads = vjp((dout, dlse))
  return grads if slopes is not None else grads[:3]


primitives.register_lowerings(_reference_forward, _reference_backward, "cpu")


def _cpu_mesh(axis_type):
  return jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type,) * 2,
                       devices=jax.devices("cpu")[:8])


def _sharded_masks(mesh, batch, sq, sk, heads, head_axis):
  rng = np.random.default_rng(3)
  return MaskArrays(
      alibi_slopes=jax.device_put(
          jnp.asarray(rng.uniform(0.1, 0.5, (batch, heads)), jnp.float32),
          NamedSharding(mesh, P("data", head_axis))),
      q_segment_ids=jax.device_put(
          jnp.asarray(rng.integers(0, 2, (batch, sq)), jnp.int32),
                                   NamedSharding(mesh, P("data"))),
      kv_segment_ids=jax.device_put(
          jnp.asarray(rng.integers(0, 2, (batch, sk)), jnp.int32),
          NamedSharding(mesh, P("data"))),
      kv_lengths=jax.device_put(jnp.array([20, 24, 3, 11], jnp.int32),
                                NamedSharding(mesh, P("data"))))


def _value_and_grads(q, k, v, masks, dout):
  def attend(q, k, v, slopes):
    out, _ = cuda.attention(q, k, v, CONFIG,
                            masks._replace(alibi_slopes=slopes))
    return out

  out, vjp = jax.vjp(attend, q, k, v, masks.alibi_slopes)
  return (out,) + vjp(dout)


def _compile_and_run(shardy, fn, args):
  """(compiled jit(fn), its results) under the chosen partitioner."""
  previous = jax.config.jax_use_shardy_partitioner
  jax.config.update("jax_use_shardy_partitioner", shardy)
  try:
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, compiled(*args)
  finally:
    jax.config.update("jax_use_shardy_partitioner", previous)


@on_cpu
@pytest.mark.parametrize("shardy", [True, False])
@pytest.mark.parametrize("q_spec,local", [
    (P("data", None, "model"), True),
    (P("data"), True),
    (P(None, "data"), False),    # sequence-sharded queries are gathered
])
def test_sharded_inputs_run_locally(shardy, q_spec, local, monkeypatch,
                                    caplog):
  monkeypatch.setattr(partitioning, "_logged_gathers", set())
  mesh = _cpu_mesh(jax.sharding.AxisType.Auto)
  q, k, v = random_qkv(1, 4, 16, 24, 8, 4, 32, dtype=jnp.bfloat16)
  dout = jnp.asarray(np.random.default_rng(2).standard_normal(q.shape),
                     jnp.bfloat16)
  kv_spec = q_spec if q_spec != P(None, "data") else P("data")
  head_axis = "model" if len(q_spec) > 2 else None
  put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
  args = (put(q, q_spec), put(k, kv_spec), put(v, kv_spec),
          _sharded_masks(mesh, 4, 16, 24, 8, head_axis), put(dout, q_spec))
  SEEN_SHAPES.clear()
  compiled, got = _compile_and_run(shardy, _value_and_grads, args)
  shapes = set(SEEN_SHAPES)
  hlo = compiled.as_text()
  expected = jax.jit(_value_and_grads)(
      q, k, v, jax.device_get(args[3]), dout)
  for a, e in zip(got, expected):
    np.testing.assert_allclose(np.asarray(a, np.float32),
                               np.asarray(e, np.float32), atol=1e-2)
  if local:
    assert not [c for c in COLLECTIVES if c in hlo], hlo
    heads = 2 if q_spec == P("data", None, "model") else 8
    assert (2, 16, heads, 32) in shapes      # a shard, not the whole
    assert got[0].sharding.is_equivalent_to(NamedSharding(mesh, q_spec), 4)
  else:
    assert "all-gather" in hlo
    # The gather is said, once, with the way around it.
    said = [r.getMessage() for r in caplog.records
            if "sharded over its sequence" in r.getMessage()]
    assert len(said) == 1 and "ring_attention" in said[0], said


@on_cpu
def test_vmap_runs_as_one_batch_on_cpu():
  q, k, v = random_qkv(4, 2, 9, 12, 4, 2, 32, dtype=jnp.bfloat16)
  qs = jnp.stack([q, 2 * q, -q], axis=1)
  lengths = jnp.array([[3, 9], [12, 1], [0, 7]], jnp.int32)

  def one(q, k, v, kv_lengths):
    return cuda.attention(q, k, v, CONFIG, MaskArrays(kv_lengths=kv_lengths))

  got = jax.jit(jax.vmap(one, in_axes=(1, None, None, 0)))(qs, k, v, lengths)
  for i in range(3):
    want = one(qs[:, i], k, v, lengths[i])
    for a, e in zip(got, want):
      np.testing.assert_allclose(np.asarray(a[i], np.float32),
                                 np.asarray(e, np.float32), atol=1e-6)


def _loss_and_grads(q, k, v):
  def loss(q, k, v):
    out, lse = cuda.attention(q, k, v, CONFIG, MaskArrays())
    return jnp.sum(out.astype(jnp.float32)) + jnp.sum(lse)
  return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)


@on_cpu
def test_shard_map_calls_the_local_function():
  mesh = _cpu_mesh(jax.sharding.AxisType.Auto)
  q, k, v = random_qkv(5, 4, 16, 24, 8, 4, 32, dtype=jnp.bfloat16)
  spec = P("data", None, "model")
  per_shard = jax.shard_map(lambda q, k, v: _loss_and_grads(q, k, v)[1],
                            mesh=mesh, in_specs=spec, out_specs=spec)
  SEEN_SHAPES.clear()
  got = jax.jit(per_shard)(q, k, v)
  assert SEEN_SHAPES == [(2, 16, 2, 32)]
  want = jax.jit(_loss_and_grads)(q, k, v)[1]
  for a, e in zip(got, want):
    np.testing.assert_allclose(np.asarray(a, np.float32),
                               np.asarray(e, np.float32), atol=2e-2)


@on_cpu
@pytest.mark.parametrize("mesh_context", [True, False])
def test_explicit_sharding_runs_per_shard(mesh_context):
  mesh = _cpu_mesh(jax.sharding.AxisType.Explicit)
  q, k, v = random_qkv(6, 4, 16, 24, 8, 4, 32, dtype=jnp.bfloat16)
  SEEN_SHAPES.clear()
  # Arrays placed with NamedShardings carry the mesh; no context is needed.
  sharding = NamedSharding(mesh, P("data", None, "model"))
  args = tuple(jax.device_put(x, sharding) for x in (q, k, v))
  if mesh_context:
    with jax.set_mesh(mesh):
      compiled = jax.jit(_loss_and_grads).lower(*args).compile()
      _, grads = compiled(*args)
  else:
    compiled = jax.jit(_loss_and_grads).lower(*args).compile()
    _, grads = compiled(*args)
  assert set(SEEN_SHAPES) == {(2, 16, 2, 32)}
  assert "all-gather" not in compiled.as_text()
  want = jax.jit(_loss_and_grads)(q, k, v)[1]
  for x, g, e in zip(args, grads, want):
    assert jax.typeof(g).sharding.spec == jax.typeof(x).sharding.spec
    np.testing.assert_allclose(np.asarray(g, np.float32),
                               np.asarray(e, np.float32), atol=2e-2)


@on_cpu
@pytest.mark.parametrize("d,alibi", [(256, False), (64, True)])
def test_lse_gradient_reaches_the_backward(d, alibi):
  q, k, v = random_qkv(7, 1, 8, 12, 2, 1, d, dtype=jnp.bfloat16)
  slopes = jnp.array([[0.3, 0.1]], jnp.float32) if alibi else None

  def loss(attend):
    def value(q, k, v, slopes):
      out, lse = attend(q, k, v, CONFIG, MaskArrays(alibi_slopes=slopes))
      return jnp.sum(out.astype(jnp.float32)) + jnp.sum(lse)
    return jax.jit(jax.grad(value, argnums=(0, 1, 2, 3) if alibi else
                            (0, 1, 2)))

  got = loss(cuda.attention)(q, k, v, slopes)
  want = loss(reference_attention)(q, k, v, slopes)
  for a, e in zip(got, want):        # equal up to bf16 rounding
    np.testing.assert_allclose(np.asarray(a, np.float32),
                               np.asarray(e, np.float32), atol=2e-2,
                               rtol=1e-2)
