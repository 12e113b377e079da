"""Results tables: markdown (report.md) for people, JSON (report.json) for programs.

A column is a (key, header, format) triple: `row[key]` is printed with `format.format(value)`; a
missing or None value prints as "-".
"""

from __future__ import annotations

import json
import math
import os
from typing import Iterable, Sequence

import numpy as np

FD_EVAL_NOTE = ("FD_eval: Fréchet distance between Gaussians fitted to generated and validation "
                "images in the features of the in-the-box evaluator network, not FID (which uses "
                "Inception-v3 features on ImageNet); compare it only within this table.")

# The walking skeleton's table (keys as evaluation.pipeline_report's rows).
SKELETON_COLUMNS = [
    ("tokenizer", "Tokenizer", "{}"),
    ("codebook_usage", "Codebook usage (%)", "{:.1f}"),
    ("psnr", "PSNR (dB)", "{:.2f}"),
    ("ppl", "PPL", "{:.2f}"),
    ("fd_eval", "FD_eval (evaluator features, not FID)", "{:.2f}"),
    ("sample_accuracy", "Sample class acc.", "{:.3f}"),
]
SKELETON_NOTES = [
    "Codebook usage: % of codes used at least once on the validation split.",
    "PSNR: mean over validation images of -10 log10 MSE, pixels in [0, 1].",
    "PPL: the proposal network's perplexity on validation tokens (exp of the mean NLL in nats).",
    FD_EVAL_NOTE,
    "Sample class acc.: the evaluator network's accuracy at predicting the conditioning class of "
    "generated samples.",
]


def _cell(value, fmt: str) -> str:
  if value is None:
    return "-"
  if isinstance(value, (np.generic, np.ndarray)) and np.ndim(value) == 0:
    value = value.item()
  try:
    text = fmt.format(value)
  except (ValueError, TypeError):
    text = str(value)
  return text.replace("|", "\\|").replace("\n", " ")


def format_table(rows: Sequence[dict], columns: Iterable[tuple[str, str, str]]) -> str:
  """A markdown table with one line per row and one column per (key, header, format)."""
  columns = list(columns)
  header = "| " + " | ".join(h.replace("|", "\\|") for _, h, _ in columns) + " |"
  sep = "|" + "|".join("---" for _ in columns) + "|"
  lines = [header, sep]
  for row in rows:
    lines.append("| " + " | ".join(_cell(row.get(k), fmt) for k, _, fmt in columns) + " |")
  return "\n".join(lines)


def to_jsonable(value):
  """numpy / jax scalars and arrays -> Python numbers and lists; non-finite floats -> "nan",
  "inf", "-inf" strings (strict JSON has no NaN)."""
  if isinstance(value, dict):
    return {str(k): to_jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_jsonable(v) for v in value]
  if isinstance(value, (str, bool, int)) or value is None:
    return value
  if hasattr(value, "__array__") or isinstance(value, np.generic):
    arr = np.asarray(value)
    return to_jsonable(arr.item() if arr.ndim == 0 else arr.tolist())
  if isinstance(value, float):
    return value if math.isfinite(value) else ("nan" if math.isnan(value) else
                                               ("inf" if value > 0 else "-inf"))
  return str(value)


def write_report(rows: Sequence[dict], columns: Iterable[tuple[str, str, str]], out_dir: str,
                 title: str, notes: Iterable[str] = (), sections: Iterable[tuple[str, str]] = (),
                 extra: dict | None = None, display_rows: Sequence[dict] | None = None) -> str:
  """Writes `out_dir/report.md` (title, table, notes as a list, then each (heading, markdown)
  section) and `out_dir/report.json` ({"title", "columns": [{"key", "header"}], "rows", "notes"}
  plus the keys of `extra`); returns the markdown. `display_rows` (e.g. preformatted cells) are
  printed in the markdown table instead of `rows`; the JSON keeps `rows`."""
  columns, notes = list(columns), list(notes)
  os.makedirs(out_dir, exist_ok=True)
  md = f"# {title}\n\n{format_table(rows if display_rows is None else display_rows, columns)}\n"
  if notes:
    md += "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
  for heading, body in sections:
    md += f"\n## {heading}\n\n{body.rstrip()}\n"
  with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as f:
    f.write(md)
  payload = {"title": title, "columns": [{"key": k, "header": h} for k, h, _ in columns],
             "rows": to_jsonable(list(rows)), "notes": notes, **to_jsonable(extra or {})}
  with open(os.path.join(out_dir, "report.json"), "w", encoding="utf-8") as f:
    json.dump(payload, f, indent=2, ensure_ascii=False, allow_nan=False)
    f.write("\n")
  return md
