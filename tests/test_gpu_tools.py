"""CPU tests of the GPU measuring tools' own logic (tools/gpu)."""

import importlib.util
import pathlib

import pytest

TOOLS = pathlib.Path(__file__).resolve().parents[1] / "tools" / "gpu"


def _load(name: str):
  spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


_HEADER = ('"ID","Kernel Name","Metric Name","Metric Unit","Metric Value"\n')


def _row(i: int, name: str, unit: str, value: str) -> str:
  return (f'"{i}","{name}","gpu__time_duration.sum","{unit}","{value}"\n')


def test_kernel_times_summary_keeps_launch_order_and_last_launch(tmp_path):
  log = tmp_path / "ncu.csv"
  log.write_text(
      "==PROF== Connected to process\n" + _HEADER
      + _row(0, "preprocess", "us", "70.5")
      + _row(1, "main", "ms", "1.25")
      + _row(2, "preprocess", "us", "72.0")
      + _row(3, "main", "ns", "1,200,000")
      + _row(4, "other", "us", "1.0"))
  rows = _load("kernel_times").summarize(log)
  assert [(n, k) for n, k, _ in rows] == [("preprocess", 2), ("main", 2),
                                          ("other", 1)]
  assert rows[0][2] == pytest.approx(72.0)
  assert rows[1][2] == pytest.approx(1200.0)


def test_kernel_times_summary_rejects_an_unknown_unit(tmp_path):
  log = tmp_path / "ncu.csv"
  log.write_text(_HEADER + _row(0, "main", "cycle", "5"))
  with pytest.raises(ValueError, match="cycle"):
    _load("kernel_times").summarize(log)


def _record(impl, kind="decode", kv_len=8192, value=1000.0, status="ok"):
  key = "gbps" if kind == "decode" else "tflops"
  return {"case": {"kind": kind, "batch": 4, "q_len": 1, "kv_len": kv_len,
                   "head_dim": 128, "causal": False, "page_size": 0},
          "impl": impl, "mode": "fwd", "status": status, key: value}


def test_compare_libraries_pairs_problems_and_finds_the_best_other():
  tool = _load("compare_libraries")
  ours = "jax_flash_kvcache_cuda"
  base = [_record(ours, kv_len=8192, value=2000.0),
          _record(ours, kv_len=32768, value=3000.0)]
  new = [_record(ours, kv_len=32768, value=3300.0),
         _record(ours, kv_len=8192, value=2200.0),
         _record("jax_cudnn", kv_len=8192, value=2500.0),
         _record("fa3_kvcache", kv_len=8192, value=2400.0),
         _record("jax_cudnn", kv_len=32768, value=0.0, status="skipped")]
  rows = tool.compare(base, new, ours)
  assert [(r["case"]["kv_len"], r["base"], r["new"], r["best_other"])
          for r in rows] == [(32768, 3000.0, 3300.0, None),
                             (8192, 2000.0, 2200.0, 2500.0)]
  table = tool.markdown(rows)
  assert ("| decode B=4 Sq=1 contiguous Sk=8192 D=128 | GB/s | 2000 | 2200 "
          "| 1.100 | 2500 | 0.880 |") in table
  assert "| 3000 | 3300 | 1.100 | - | - |" in table


def test_compare_libraries_reads_tflops_for_training_cases():
  tool = _load("compare_libraries")
  record = _record("jax_flash_cuda", kind="mha", value=650.0)
  assert tool.metric(record) == ("TFLOP/s", 650.0)
  assert tool.metric(_record("jax_flash_cuda", status="failed")) == (
      "GB/s", None)


def test_compare_libraries_averages_each_builds_runs():
  tool = _load("compare_libraries")
  ours = "jax_flash_kvcache_cuda"
  base_1 = [_record(ours, value=2000.0)]
  base_2 = [_record(ours, value=2200.0)]
  new_1 = [_record(ours, value=2300.0), _record("jax_cudnn", value=2500.0)]
  new_2 = [_record(ours, value=2500.0)]
  rows = tool.compare(base_1, new_1, ours, base_runs=[base_1, base_2],
                      new_runs=[new_1, new_2])
  assert len(rows) == 1
  row = rows[0]
  assert (row["base"], row["new"], row["best_other"]) == (2100.0, 2400.0,
                                                          2500.0)
  assert (row["base_runs"], row["new_runs"]) == ([2000.0, 2200.0],
                                                 [2300.0, 2500.0])
  table = tool.markdown(rows)
  assert "| 2100 | 2400 | 1.143 | 2500 | 0.960 | 2000, 2200 | 2300, 2500 |" \
      in table
  # A run in which the build failed leaves its mean unknown, not biased.
  failed = [_record(ours, value=0.0, status="failed")]
  rows = tool.compare(base_1, new_1, ours, base_runs=[base_1, failed],
                      new_runs=[new_1, new_2])
  assert rows[0]["base"] is None
