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
