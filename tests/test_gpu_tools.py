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


def test_compare_libraries_runs_several_builds_in_a_palindrome():
  tool = _load("compare_libraries")
  assert tool.run_order(2, abba=True) == [0, 1, 1, 0]
  assert tool.run_order(3, abba=True) == [0, 1, 2, 2, 1, 0]
  assert tool.run_order(3, abba=False) == [0, 1, 2]
  assert [tool._run_dir(b, r, 2) for b, r in ((0, 1), (1, 1), (1, 2),
                                               (0, 2))] == [
      "base", "new", "new_2", "base_2"]
  assert tool._run_dir(2, 2, 3) == "new2_2"


def test_compare_libraries_main_compares_each_build_with_the_base(
    tmp_path, monkeypatch):
  tool = _load("compare_libraries")
  ours = "jax_flash_kvcache_cuda"
  libraries = []
  for name in ("base.so", "a.so", "b.so"):
    (tmp_path / name).write_bytes(b"")
    libraries.append(str(tmp_path / name))
  speed = {"base.so": 2000.0, "a.so": 2200.0, "b.so": 1800.0}
  calls = []

  def fake_run(library, impls, out, bench_args):
    calls.append((library.name, tuple(impls), out.name))
    records = [_record(ours, value=speed[library.name] + len(calls))]
    if "jax_cudnn" in impls:
      records.append(_record("jax_cudnn", value=2500.0))
    return records

  monkeypatch.setattr(tool, "_run", fake_run)
  out = tmp_path / "out"
  out.mkdir()
  assert tool.main([*libraries, "--out", str(out), "--abba", "--others",
                    "jax_cudnn", "--", "--kinds", "decode"]) == 0
  assert calls == [("base.so", (ours,), "base"),
                   ("a.so", (ours, "jax_cudnn"), "new1"),
                   ("b.so", (ours,), "new2"),
                   ("b.so", (ours,), "new2_2"),
                   ("a.so", (ours,), "new1_2"),
                   ("base.so", (ours,), "base_2")]
  table = (out / "comparison.md").read_text()
  # Each build the mean of its runs (calls 2 and 5 for a.so, 3 and 4 for
  # b.so, 1 and 6 for the base), the best other from a.so's first run.
  assert "## a.so against base.so" in table
  assert "| 2004 | 2204 | 1.100 | 2500 | 0.881 | 2001, 2006 | 2202, 2205 |" \
      in table
  assert "## b.so against base.so" in table
  assert "| 2004 | 1804 | 0.900 | 2500 | 0.721 | 2001, 2006 | 1803, 1804 |" \
      in table
