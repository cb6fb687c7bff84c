"""Tests of the benchmark harness: work counts, timing, checks, report, and
`python -m jax_flash.bench --quick` end to end on CPU."""

from __future__ import annotations

import dataclasses
import json
import time

import jax
import numpy as np
import pytest

from jax_flash.bench import __main__ as bench_main
from jax_flash.bench import (cases, checks, flops, implementations, report,
                              runner, timing)


def _brute_force_pairs(q_len, kv_len, causal, window):
  left, right = window
  count = 0
  for i in range(q_len):
    for j in range(kv_len):
      d = i + kv_len - q_len - j
      visible = ((left < 0 or d <= left) and (right < 0 or -d <= right)
                 and (not causal or d >= 0))
      count += visible
  return count


@pytest.mark.parametrize("q_len,kv_len", [(1, 1), (1, 37), (17, 17),
                                          (13, 40), (40, 13), (64, 64)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [(-1, -1), (5, -1), (-1, 3), (0, 0),
                                    (7, 2)])
def test_visible_pairs_match_brute_force(q_len, kv_len, causal, window):
  assert flops.visible_pairs(q_len, kv_len, causal=causal, window=window) == (
      _brute_force_pairs(q_len, kv_len, causal, window))


def test_attention_flops_convention():
  b, h, s, d = 2, 3, 128, 64
  full = flops.attention_flops(b, h, s, s, d)
  assert full == 4 * b * h * s * s * d
  causal = flops.attention_flops(b, h, s, s, d, causal=True)
  assert causal == 4 * b * h * d * s * (s + 1) // 2
  assert flops.attention_flops(b, h, s, s, d, mode="bwd") == 2.5 * full
  assert flops.attention_flops(b, h, s, s, d, mode="fwd_bwd") == 3.5 * full
  # Sq != Sk: one query row against Sk keys.
  assert flops.attention_flops(1, 1, 1, 1000, d, causal=True) == 4 * 1000 * d
  with pytest.raises(ValueError):
    flops.attention_flops(b, h, s, s, d, mode="backward")


def test_kv_read_bytes():
  assert flops.kv_read_bytes(2, 1024, 8, 128) == 2 * 1024 * 8 * 256 * 2


def test_time_calls_rotates_inputs_and_takes_median():
  launched = []
  waited = []

  def launch(i):
    time.sleep(0.002)
    launched.append(i)
    return i

  result = timing.time_calls(launch, waited.append, rounds=3, calls=4,
                             warmup=1)
  assert result.calls_per_round == 4
  assert len(result.round_seconds) == 3
  assert 0.0015 < result.seconds < 0.05
  assert result.seconds == sorted(result.round_seconds)[1]
  # Each round launches inputs 0..calls-1 back to back and waits once.
  assert launched[-4:] == [0, 1, 2, 3]
  assert waited[-1] == 3
  assert len(waited) == 2 + 3


def test_time_calls_shortens_rounds_of_slow_calls():
  result = timing.time_calls(lambda i: time.sleep(0.02), lambda _: None,
                             rounds=2, calls=30, max_round_seconds=0.05)
  assert 1 <= result.calls_per_round <= 3


def test_input_sets_overflow_l2():
  assert timing.input_sets_needed(10**10) == 1
  small = 2**20
  n = timing.input_sets_needed(small)
  assert n == timing.MAX_INPUT_SETS or n * small >= timing.L2_ROTATION_BYTES


@pytest.mark.parametrize("causal", [False, True])
def test_reference_rows_match_jax(causal):
  rng = np.random.default_rng(0)
  sq, sk, h, hkv, d = 9, 23, 4, 2, 8
  q = rng.standard_normal((sq, h, d)).astype(np.float32)
  k = rng.standard_normal((sk, hkv, d)).astype(np.float32)
  v = rng.standard_normal((sk, hkv, d)).astype(np.float32)
  mask = None
  if causal:
    mask = np.arange(sk)[None, :] <= np.arange(sq)[:, None] + (sk - sq)
  expected = jax.nn.dot_product_attention(
      q[None], k[None], v[None], mask=None if mask is None else mask[None, None],
      scale=0.3)[0]
  got = checks.reference_rows(q[4:], k, v, first_row=4, q_len=sq,
                              softmax_scale=0.3, causal=causal)
  np.testing.assert_allclose(got, np.asarray(expected)[4:], atol=1e-5)
  assert checks.relative_error(np.asarray(expected), q, k, v,
                               softmax_scale=0.3, causal=causal) < 1e-5
  assert checks.relative_error(np.asarray(expected), q, k, v,
                               softmax_scale=0.3, causal=not causal) > 1e-2


def _record(label, ours, tflops, status="ok", error=None, note=None):
  case = {"kind": "mha", "batch": 1, "q_len": 1024, "kv_len": 1024,
          "heads": 16, "kv_heads": 16, "head_dim": 128, "causal": False,
          "dtype": "bfloat16"}
  record = {"case": case, "impl": label, "label": label, "ours": ours,
            "mode": "fwd_bwd", "status": status, "note": note}
  if status == "ok":
    record.update(tflops=tflops, check_error=error, peak_bytes=2**30)
  return record


def test_ratio_uses_best_of_each_side_and_ignores_failed_checks():
  records = [_record("a", True, 300.0), _record("b", True, 400.0),
             _record("c", False, 500.0), _record("d", False, 250.0),
             _record("e", False, 900.0, error=0.5),
             _record("f", False, None, status="skipped", note="no GPU")]
  assert report.best_ratio(records, "tflops") == pytest.approx(0.8)
  assert report.best_ratio(records[:2], "tflops") is None
  env = {"date": "2026-01-01", "device": "test", "gpu": None,
         "backend": "cpu", "versions": {"jax": "0"}, "command": "x"}
  text = report.markdown(records, env)
  assert "| 128 | full | 1k |" in text
  assert "0.80×" in text
  assert "900†" in text
  assert "- f: no GPU (1×)" in text
  assert "Headline: D = 128, S = 1k" in text


def test_quick_run_writes_every_record(tmp_path, capsys):
  bench_main.main(["--quick", "--no-plots", "--out", str(tmp_path)])
  printed = capsys.readouterr().out
  assert "skipped:" not in printed
  assert "MHA D=32 causal S=64, forward: jax_flash blockwise" in printed
  assert printed.count("\n") < 40
  results = json.loads((tmp_path / "results.json").read_text())
  records = results["records"]
  assert results["environment"]["backend"] == jax.default_backend()
  expected = sum(len(case.modes) for case in cases.quick_grid())
  by_impl = {}
  for record in records:
    by_impl.setdefault(record["impl"], []).append(record)
  assert all(len(rs) == expected for rs in by_impl.values())
  for name in ("jax_flash_xla", "jax_xla"):
    for record in by_impl[name]:
      assert record["status"] == "ok", record
      assert record["tflops"] > 0
      if record["mode"] == "fwd":
        assert record["check_error"] < checks.MAX_RELATIVE_ERROR
      if record["case"]["kind"] == "decode":
        assert record["gbps"] > 0
  for record in records:
    if record["status"] != "ok":
      assert record["note"]
  text = (tmp_path / "results.md").read_text()
  assert "jax_flash / best other" in text
  assert "decoding" in text


def test_plots_from_json(tmp_path):
  pytest.importorskip("matplotlib")
  records = [_record("a", True, 300.0), _record("c", False, 500.0)]
  env = {"date": "2026-01-01", "device": "test", "gpu": None,
         "backend": "cpu", "versions": {"jax": "0"}, "command": "x"}
  source = tmp_path / "in.json"
  source.write_text(json.dumps({"environment": env, "records": records}))
  bench_main.main(["--from-json", str(source), "--out", str(tmp_path / "out")])
  assert (tmp_path / "out" / "mha_fwd_bwd.png").stat().st_size > 1000
  assert "0.60×" in (tmp_path / "out" / "results.md").read_text()


def test_isolated_run_merges_one_process_per_implementation(tmp_path):
  bench_main.main(["--quick", "--isolate", "--no-plots", "--kinds", "decode",
                   "--impls", "jax_xla,jax_flash_xla", "--out", str(tmp_path)])
  records = json.loads((tmp_path / "results.json").read_text())["records"]
  assert sorted(r["impl"] for r in records) == ["jax_flash_xla", "jax_xla"]
  assert all(r["status"] == "ok" for r in records)
  for name in ("jax_xla", "jax_flash_xla"):
    assert (tmp_path / "parts" / name / "results.json").exists()
  assert "--isolate" in (tmp_path / "results.md").read_text()


def test_merging_results_keeps_the_first_record_and_every_command(tmp_path):
  env = {"date": "2026-01-01", "device": "test", "gpu": None,
         "backend": "cpu", "versions": {"jax": "0"}}
  first, second = tmp_path / "first.json", tmp_path / "second.json"
  first.write_text(json.dumps({
      "environment": dict(env, command="run one"),
      "records": [_record("a", True, 300.0)]}))
  second.write_text(json.dumps({
      "environment": dict(env, command="run two"),
      "records": [_record("a", True, 100.0), _record("c", False, 500.0)]}))
  records, merged = bench_main.load_results([first, second])
  assert [(r["impl"], r["tflops"]) for r in records] == [("a", 300.0),
                                                         ("c", 500.0)]
  assert merged["command"] == "run one`; `run two"


def test_paged_decoding_case_runs_on_the_kv_cache_api_only():
  case = cases.Case("decode", 2, 1, 128, 4, 2, 32, False, page_size=16)
  table = implementations.page_table(case)
  # Each row visits exactly its own blocks, in a shuffled order.
  assert sorted(table[1].tolist()) == list(range(8, 16))
  assert table[0].tolist() != list(range(8))
  settings = runner.Settings(rounds=1, calls=1, warmup=1, modes=("fwd",))
  records = runner.run_case(
      case, implementations.by_name(["jax_flash_kvcache_xla", "jax_xla"]),
      settings, seed=0, log=lambda line: None)
  by_impl = {r["impl"]: r for r in records}
  ours = by_impl["jax_flash_kvcache_xla"]
  assert ours["status"] == "ok", ours
  assert ours["check_error"] < checks.MAX_RELATIVE_ERROR and ours["gbps"] > 0
  assert by_impl["jax_xla"]["note"] == "no paged K/V cache"
  text = report.markdown(records, {
      "date": "2026-01-01", "device": "test", "gpu": None, "backend": "cpu",
      "versions": {}, "command": "x"})
  assert "| 2 | 1 | paged 16 | 128 |" in text


def test_in_program_calls_loop_the_forward_and_report_per_call():
  """--in-program-calls N: one program run makes N calls (rotating the
  input sets itself) and the record's times are per call; the output
  checked is that of input set 0, as without the loop."""
  case = cases.Case("decode", 2, 1, 128, 4, 2, 32, False)
  settings = runner.Settings(rounds=2, calls=2, warmup=1, modes=("fwd",),
                             in_program_calls=5)
  impls = implementations.by_name(["jax_flash_kvcache_xla", "jax_xla"])
  records = runner.run_case(case, impls, settings, seed=0,
                            log=lambda line: None)
  for record in records:
    assert record["status"] == "ok", record
    assert record["in_program_calls"] == 5
    assert record["calls_per_round"] % 5 == 0
    assert record["check_error"] < checks.MAX_RELATIVE_ERROR
    assert record["gbps"] > 0


@pytest.mark.parametrize("n_sets", [1, 3])
def test_looped_program_returns_set_0s_output(n_sets):
  from jax_flash.bench import jax_runner  # pylint: disable=import-outside-toplevel
  case = cases.Case("decode", 2, 1, 64, 4, 2, 32, False)
  attend = implementations.by_name(["jax_xla"])[0].build(case)
  inputs = jax_runner.make_inputs(case, n_sets, seed=3)
  looped = jax_runner.compile_mode(attend, case, "fwd", repeat=4,
                                   n_sets=n_sets)
  once = jax_runner.compile_mode(attend, case, "fwd")
  result, out = jax_runner.measure(looped, inputs, "fwd", rounds=1, calls=1,
                                   warmup=1)
  _, want = jax_runner.measure(once, inputs, "fwd", rounds=1, calls=1,
                               warmup=1)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(want))
  assert result.calls_per_round == 4
  with pytest.raises(ValueError, match="forward only"):
    jax_runner.compile_mode(attend, case, "bwd", repeat=4)


def test_head_dims_select_and_add_cases_of_every_kind():
  args = bench_main.parse_args(["--kinds", "mha,decode", "--head-dims",
                                "96,256"])
  chosen = bench_main.select_cases(args)
  assert {c.head_dim for c in chosen} == {96, 256}
  decode = [c for c in chosen if c.kind == "decode"]
  assert sorted((c.head_dim, c.kv_len) for c in decode) == sorted(
      (d, s) for d in (96, 256) for s in cases.DECODE_LENS)
  assert all(c.batch == 4 and c.q_len == 1 and not c.page_size
             for c in decode)
  mha = [c for c in chosen if c.kind == "mha"]
  assert {c.q_len for c in mha if c.head_dim == 96} == set(cases.SEQ_LENS)
  # Without --head-dims the grid is unchanged: decoding at D = 128 only.
  every = bench_main.select_cases(bench_main.parse_args(["--kinds",
                                                         "decode"]))
  assert {c.head_dim for c in every} == {128}


def test_decoding_tables_keep_head_dims_apart():
  def record(head_dim, impl, gbps):
    case = cases.Case("decode", 4, 1, 8192, 32, 8, head_dim, False)
    return {"case": dataclasses.asdict(case), "mode": "fwd", "impl": impl,
            "label": impl, "ours": impl == "ours", "status": "ok",
            "gbps": gbps, "tflops": 1.0}
  records = [record(64, "ours", 1000.0), record(64, "other", 500.0),
             record(256, "ours", 3000.0), record(256, "other", 2000.0)]
  text = report.markdown(records, {
      "date": "2026-01-01", "device": "test", "gpu": None, "backend": "cpu",
      "versions": {}, "command": "x"})
  d64, d256 = text.split("D = 64)")[1].split("D = 256)")
  assert "| 1000 | 500 | 2.00× |" in d64 and "3000" not in d64
  assert "| 3000 | 2000 | 1.50× |" in d256
  lines = report.summary(records).splitlines()
  assert any("D=64" in l and "2.00×" in l for l in lines)
  assert any("D=256" in l and "1.50×" in l for l in lines)
