"""PNG charts of benchmark records, in the style of FlashAttention's.

One figure per (kind, mode): a grid of panels, one row per head dim and one
column per mask, each a grouped bar chart of TFLOP/s against S with one bar
per implementation. Decoding gets a panel of GB/s against Sk per (B, Sq,
cache layout).
"""

from __future__ import annotations

import pathlib
from typing import Any, Optional

from jax_flash.bench import report

Record = dict[str, Any]


def available() -> Optional[str]:
  """None when matplotlib can be imported, else why not."""
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    return "matplotlib is not installed"
  return None


def _panel(axes: Any, records: list[Record], x_field: str, metric: str,
           labels: list[str]) -> None:
  xs = sorted({r["case"][x_field] for r in records})
  width = 0.8 / max(len(labels), 1)
  for index, label in enumerate(labels):
    values = {r["case"][x_field]: r[metric] for r in records
              if r["label"] == label and r["status"] == "ok"}
    positions = [i + (index - (len(labels) - 1) / 2) * width
                 for i, x in enumerate(xs) if x in values]
    heights = [values[x] for x in xs if x in values]
    bars = axes.bar(positions, heights, width, label=label)
    axes.bar_label(bars, labels=[report.format_number(h) for h in heights],
                   fontsize=5, rotation=90, padding=2)
  axes.set_xticks(range(len(xs)), [report.short_length(x) for x in xs])
  axes.margins(y=0.2)


def _figure(records: list[Record], panels: list[tuple[str, list[Record]]],
            columns: int, x_field: str, metric: str, title: str,
            path: pathlib.Path) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  from matplotlib import pyplot  # pylint: disable=import-outside-toplevel
  # Implementation order (records come in it), so colours are stable.
  measured = {r["label"] for r in records if r["status"] == "ok"}
  labels = [l for l in dict.fromkeys(r["label"] for r in records)
            if l in measured]
  rows = -(-len(panels) // columns)
  figure, grid = pyplot.subplots(rows, columns, squeeze=False,
                                 figsize=(6.5 * columns, 3.6 * rows))
  for axes, (name, chosen) in zip(grid.flat, panels):
    _panel(axes, chosen, x_field, metric, labels)
    axes.set_title(name, fontsize=10)
    axes.set_ylabel("GB/s" if metric == "gbps" else "TFLOP/s")
  for axes in list(grid.flat)[len(panels):]:
    axes.set_visible(False)
  handles, names = grid.flat[0].get_legend_handles_labels()
  figure.legend(handles, names, loc="lower center", ncol=min(len(names), 4),
                fontsize=8)
  figure.suptitle(title)
  figure.tight_layout(rect=(0, 0.08, 1, 0.96))
  figure.savefig(path, dpi=110)
  pyplot.close(figure)


def write_plots(records: list[Record], directory: pathlib.Path,
                device: str) -> list[pathlib.Path]:
  """Writes every chart the records allow; returns the files written."""
  written = []
  for kind in ("mha", "gqa"):
    for mode, mode_title in report.MODE_TITLES.items():
      chosen = [r for r in records
                if r["case"]["kind"] == kind and r["mode"] == mode]
      if not any(r["status"] == "ok" for r in chosen):
        continue
      panels = []
      for head_dim in sorted({r["case"]["head_dim"] for r in chosen}):
        for causal in (False, True):
          panel = [r for r in chosen if r["case"]["head_dim"] == head_dim
                   and r["case"]["causal"] == causal]
          if panel:
            mask = "causal" if causal else "full"
            panels.append((f"D = {head_dim}, {mask}", panel))
      path = directory / f"{kind}_{mode}.png"
      _figure(chosen, panels, 2, "q_len", "tflops",
              f"{report.KIND_TITLES[kind]} {mode_title}, {device}", path)
      written.append(path)
  chosen = [r for r in records if r["case"]["kind"] == "decode"]
  if any(r["status"] == "ok" for r in chosen):
    variants: dict[tuple, list[Record]] = {}
    for record in chosen:
      case = record["case"]
      variants.setdefault((case["batch"], case["q_len"],
                           report.decode_cache(case)), []).append(record)
    panels = [(f"B = {b}, Sq = {sq}, {cache}", panel)
              for (b, sq, cache), panel in variants.items()]
    path = directory / "decode.png"
    _figure(chosen, panels, min(len(panels), 2), "kv_len", "gbps",
            f"{report.KIND_TITLES['decode']}, K/V read bandwidth, {device}",
            path)
    written.append(path)
  return written
