"""Results tables: markdown for people, JSON for programs."""

from __future__ import annotations

import json
import os


def format_table(rows: list[dict], columns) -> str:
  """columns: (key, header, format) triples; a missing value prints as "-"."""
  header = "| " + " | ".join(h for _, h, _ in columns) + " |"
  sep = "|" + "|".join("---" for _ in columns) + "|"
  lines = [header, sep]
  for row in rows:
    cells = [fmt.format(row[k]) if row.get(k) is not None else "-" for k, _, fmt in columns]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def write_report(rows: list[dict], columns, out_dir: str, title: str, notes=()) -> str:
  """Writes report.md and report.json in out_dir and returns the markdown."""
  os.makedirs(out_dir, exist_ok=True)
  md = f"# {title}\n\n{format_table(rows, columns)}\n"
  if notes:
    md += "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
  with open(os.path.join(out_dir, "report.md"), "w") as f:
    f.write(md)
  with open(os.path.join(out_dir, "report.json"), "w") as f:
    json.dump({"title": title, "rows": rows, "notes": list(notes)}, f, indent=2, default=float)
  return md
