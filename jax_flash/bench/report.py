"""Markdown tables of benchmark records.

Every table has one row per problem and one column per implementation that
ran at least once in it, then the ratio of the best jax_flash implementation
to the best other one measured in the same run. Implementations that were
skipped are listed under the table with the reason. `summary` is the short
form for a terminal, as `--quick` prints it.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Iterable, Optional

from jax_flash.bench import checks

MODE_TITLES = {"fwd": "forward", "bwd": "backward",
               "fwd_bwd": "forward + backward"}
KIND_TITLES = {"mha": "MHA", "gqa": "GQA", "decode": "decoding"}

Record = dict[str, Any]


def format_number(value: Optional[float]) -> str:
  """Three significant digits below 100, whole numbers above; '–' for none."""
  if value is None:
    return "–"
  return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def best_ratio(records: Iterable[Record], metric: str) -> Optional[float]:
  """Best jax_flash value over best other value, among measured records."""
  ours, others = [], []
  for record in records:
    if record["status"] == "ok" and not _failed_check(record):
      (ours if record["ours"] else others).append(record[metric])
  if not ours or not others:
    return None
  return max(ours) / max(others)


def _failed_check(record: Record) -> bool:
  error = record.get("check_error")
  return error is not None and not error <= checks.MAX_RELATIVE_ERROR


def _cell(record: Optional[Record], metric: str) -> str:
  if record is None or record["status"] != "ok":
    return "–"
  text = format_number(record[metric])
  return f"{text}†" if _failed_check(record) else text


def short_length(value: int) -> str:
  """512 → '512', 16384 → '16k'."""
  return f"{value // 1024}k" if value >= 1024 and value % 1024 == 0 else str(value)


def _table(records: list[Record], row_key: Callable[[Record], tuple],
           row_headers: list[str], metric: str) -> list[str]:
  """Rows keyed by row_key (in first-seen order), columns by implementation."""
  labels = list(dict.fromkeys(r["label"] for r in records))
  measured = [l for l in labels
              if any(r["label"] == l and r["status"] == "ok" for r in records)]
  rows: dict[tuple, dict[str, Record]] = collections.OrderedDict()
  for record in records:
    rows.setdefault(row_key(record), {})[record["label"]] = record
  lines = ["| " + " | ".join(row_headers + measured
                             + ["jax_flash / best other"]) + " |",
           "|" + "---|" * (len(row_headers) + len(measured) + 1)]
  for key, cells in rows.items():
    ratio = best_ratio(cells.values(), metric)
    values = [_cell(cells.get(label), metric) for label in measured]
    ratio_text = "–" if ratio is None else f"{ratio:.2f}×"
    lines.append("| " + " | ".join(list(key) + values + [ratio_text]) + " |")
  return lines + [""] + _notes(records)


def _notes(records: list[Record]) -> list[str]:
  """One line per (implementation, reason) for skipped or flagged records."""
  counts: dict[tuple[str, str], int] = collections.Counter()
  for record in records:
    if record.get("note"):
      counts[(record["label"], record["note"])] += 1
  lines = [f"- {label}: {note} ({n}×)" for (label, note), n in counts.items()]
  if any(_failed_check(r) for r in records):
    lines.append(f"- † relative error above {checks.MAX_RELATIVE_ERROR:g} "
                 "against a float32 reference")
  return (["Not measured or flagged:"] + lines + [""]) if lines else []


def _training_row(record: Record) -> tuple:
  case = record["case"]
  return (str(case["head_dim"]), "causal" if case["causal"] else "full",
          short_length(case["q_len"]))


def decode_cache(case: dict[str, Any]) -> str:
  """'contiguous' or 'paged 16' (the block size) for a decoding case."""
  page = case.get("page_size", 0)
  return f"paged {page}" if page else "contiguous"


def _decode_row(record: Record) -> tuple:
  case = record["case"]
  return (str(case["batch"]), str(case["q_len"]), decode_cache(case),
          short_length(case["kv_len"]))


def headline(records: list[Record]) -> Optional[str]:
  """One sentence on the D = 128 forward+backward MHA case with the largest S
  (non-causal), for the README."""
  candidates = [r for r in records if r["mode"] == "fwd_bwd"
                and r["case"]["kind"] == "mha" and r["case"]["head_dim"] == 128
                and not r["case"]["causal"]]
  if not candidates:
    return None
  longest = max(r["case"]["q_len"] for r in candidates)
  row = [r for r in candidates if r["case"]["q_len"] == longest
         and r["status"] == "ok" and not _failed_check(r)]
  ours = [r for r in row if r["ours"]]
  others = [r for r in row if not r["ours"]]
  if not ours or not others:
    return None
  mine = max(ours, key=lambda r: r["tflops"])
  best = max(others, key=lambda r: r["tflops"])
  return (f"D = 128, S = {short_length(longest)}, forward + backward: "
          f"{mine['label']} {mine['tflops']:.0f} TFLOP/s, best other "
          f"({best['label']}) {best['tflops']:.0f} TFLOP/s: "
          f"{mine['tflops'] / best['tflops']:.2f}×.")


def _memory_table(records: list[Record]) -> list[str]:
  """Peak memory of forward+backward at the largest S of each (D, mask)."""
  chosen = [r for r in records if r["mode"] == "fwd_bwd"
            and r["case"]["kind"] == "mha" and r["status"] == "ok"
            and r.get("peak_bytes")]
  if not chosen:
    return []
  longest = max(r["case"]["q_len"] for r in chosen)
  chosen = [r for r in chosen if r["case"]["q_len"] == longest]
  labels = list(dict.fromkeys(r["label"] for r in chosen))
  rows: dict[tuple, dict[str, Record]] = collections.OrderedDict()
  for record in chosen:
    rows.setdefault(_training_row(record), {})[record["label"]] = record
  lines = [f"### Peak device memory, forward + backward, S = {short_length(longest)} (GiB)",
           "",
           "| D | mask | S | " + " | ".join(labels) + " |",
           "|" + "---|" * (3 + len(labels))]
  for key, cells in rows.items():
    values = [format_number(cells[l]["peak_bytes"] / 2**30) if l in cells
              else "–" for l in labels]
    lines.append("| " + " | ".join(list(key) + values) + " |")
  return lines + ["", "JAX: arguments + outputs + temporaries of the compiled "
                  "program; PyTorch: peak allocated during one call, inputs "
                  "included.", ""]


def markdown(records: list[Record], environment: dict[str, Any]) -> str:
  """The whole report: environment, headline, one table per kind and mode."""
  versions = ", ".join(f"{k} {v}" for k, v in environment["versions"].items()
                       if v is not None)
  lines = [f"Measured {environment['date']} on {environment['device']}"
           f" ({environment.get('gpu') or environment['backend']}); {versions}.",
           "", f"Command: `{environment['command']}`", ""]
  sentence = headline(records)
  if sentence:
    lines += [f"Headline: {sentence}", ""]
  for kind in KIND_TITLES:
    for mode in MODE_TITLES:
      chosen = [r for r in records
                if r["case"]["kind"] == kind and r["mode"] == mode]
      if not chosen:
        continue
      if kind == "decode":
        # One table per head shape: rows are keyed by B, Sq, cache and Sk.
        shapes: dict[tuple, list[Record]] = collections.OrderedDict()
        for r in chosen:
          c = r["case"]
          shapes.setdefault((c["heads"], c["kv_heads"], c["head_dim"]),
                            []).append(r)
        for (heads, kv_heads, head_dim), group in shapes.items():
          lines += [f"### {KIND_TITLES[kind]}, GB/s of K/V read "
                    f"(H = {heads}, Hkv = {kv_heads}, D = {head_dim})", ""]
          lines += _table(group, _decode_row, ["B", "Sq", "cache", "Sk"],
                          "gbps")
      else:
        case = chosen[0]["case"]
        group = (f" ({case['heads'] // case['kv_heads']} query heads per K/V "
                 "head)" if kind == "gqa" else "")
        lines += [f"### {KIND_TITLES[kind]}{group}, {MODE_TITLES[mode]}, "
                  "TFLOP/s", ""]
        lines += _table(chosen, _training_row, ["D", "mask", "S"], "tflops")
  lines += _memory_table(records)
  return "\n".join(lines)


def summary(records: list[Record]) -> str:
  """A few lines: one per measured (problem, mode) with every value and the
  ratio, then one line per implementation that did not run, with why."""
  groups: dict[tuple, list[Record]] = collections.OrderedDict()
  for record in records:
    kind = record["case"]["kind"]
    if kind == "decode":
      problem = "decoding B={} Sq={} {} Sk={} D={}".format(
          *_decode_row(record), record["case"]["head_dim"])
    else:
      problem = "{} D={} {} S={}".format(KIND_TITLES[kind],
                                         *_training_row(record))
    groups.setdefault((kind, problem, record["mode"]), []).append(record)
  lines = []
  for (kind, problem, mode), group in groups.items():
    metric, unit = ("gbps", "GB/s") if kind == "decode" else ("tflops",
                                                              "TFLOP/s")
    values = ", ".join(f"{r['label']} {_cell(r, metric)}" for r in group
                       if r["status"] == "ok")
    if not values:
      continue
    ratio = best_ratio(group, metric)
    ratio_text = "" if ratio is None else f" (jax_flash / best other {ratio:.2f}×)"
    lines.append(f"{problem}, {MODE_TITLES[mode]}: {values} {unit}{ratio_text}")
  reasons: dict[str, dict[str, None]] = collections.OrderedDict()
  for record in records:
    if record["status"] != "ok":
      reasons.setdefault(record["label"], {})[record["note"]] = None
  if reasons:
    lines += ["Not run here:"] + [f"- {label}: {'; '.join(notes)}"
                                  for label, notes in reasons.items()]
  return "\n".join(lines)
