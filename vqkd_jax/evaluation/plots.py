"""Bar charts drawn with PIL (no plotting library): the demo's PPL and FD_eval per tokenizer.

A panel is grouped bars: one group per label (tokenizer), one bar per series (AR, NAR, ...), each
value with an optional error bar (the spread over seeds); missing values leave a gap marked "n/a".
"""

from __future__ import annotations

import math
import os
from typing import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLOURS = ((66, 114, 196), (237, 125, 49), (112, 173, 71), (165, 165, 165), (255, 192, 0))


def _finite(v) -> bool:
  return v is not None and isinstance(v, (int, float, np.floating)) and math.isfinite(float(v))


def draw_panel(title: str, labels: Sequence[str], series: Mapping[str, Sequence],
               errors: Mapping[str, Sequence] | None = None, width: int = 900,
               height: int = 300) -> Image.Image:
  """One RGB panel [height, width]: `series` {name: values per label (None = missing)},
  `errors` {name: half-widths per label} drawn as whiskers. The y axis starts at 0."""
  font = ImageFont.load_default()
  img = Image.new("RGB", (width, height), "white")
  d = ImageDraw.Draw(img)
  left, right, top, bottom = 60, 10, 28, 50
  d.text((left, 6), title, fill="black", font=font)
  values = [float(v) + (float(e) if errors and _finite(e) else 0.0)
            for name, vals in series.items()
            for v, e in zip(vals, (errors or {}).get(name, [None] * len(vals))) if _finite(v)]
  vmax = max(values) if values else 1.0
  vmax = vmax * 1.1 if vmax > 0 else 1.0
  plot_h = height - top - bottom
  y = lambda v: top + plot_h * (1.0 - float(v) / vmax)
  d.line([(left, top), (left, height - bottom), (width - right, height - bottom)], fill="black")
  for k in range(5):  # y ticks
    v = vmax * k / 4
    d.line([(left - 4, y(v)), (left, y(v))], fill="black")
    d.text((4, y(v) - 5), f"{v:.3g}", fill="black", font=font)
  n_groups, n_series = len(labels), max(len(series), 1)
  group_w = (width - left - right) / max(n_groups, 1)
  bar_w = group_w * 0.8 / n_series
  for g, label in enumerate(labels):
    x0 = left + g * group_w + group_w * 0.1
    for s, (name, vals) in enumerate(series.items()):
      v = vals[g]
      bx = x0 + s * bar_w
      if not _finite(v):
        d.text((bx + 1, height - bottom - 12), "n/a", fill=(150, 150, 150), font=font)
        continue
      d.rectangle([bx, y(v), bx + bar_w - 2, height - bottom], fill=COLOURS[s % len(COLOURS)])
      e = (errors or {}).get(name, [None] * len(vals))[g]
      if _finite(e) and e > 0:
        cx = bx + (bar_w - 2) / 2
        d.line([(cx, y(max(v - e, 0))), (cx, y(v + e))], fill="black")
        d.line([(cx - 3, y(v + e)), (cx + 3, y(v + e))], fill="black")
    d.text((x0, height - bottom + 6), label, fill="black", font=font)
  lx = width - right - 90 * len(series)
  for s, name in enumerate(series):  # legend
    d.rectangle([lx + 90 * s, 8, lx + 90 * s + 10, 18], fill=COLOURS[s % len(COLOURS)])
    d.text((lx + 90 * s + 14, 7), name, fill="black", font=font)
  return img


def save_panels(path: str, panels: Sequence[Image.Image]) -> str:
  """Stacks panels vertically into one PNG; returns the path."""
  width = max(p.width for p in panels)
  out = Image.new("RGB", (width, sum(p.height for p in panels)), "white")
  y = 0
  for p in panels:
    out.paste(p, (0, y))
    y += p.height
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  out.save(path, format="PNG")
  return path


def save_labelled(path: str, blocks: Sequence[tuple[str, np.ndarray]], label_width: int = 96,
                  gap: int = 6) -> str:
  """Stacks uint8 images [h_i, w_i, 3] vertically, each with its label written in a white strip
  `label_width` pixels wide on its left; returns the path."""
  font = ImageFont.load_default()
  width = label_width + max(b.shape[1] for _, b in blocks)
  height = sum(b.shape[0] for _, b in blocks) + gap * (len(blocks) - 1)
  out = Image.new("RGB", (width, height), "white")
  d = ImageDraw.Draw(out)
  y = 0
  for label, block in blocks:
    out.paste(Image.fromarray(np.asarray(block, np.uint8)), (label_width, y))
    d.text((4, y + block.shape[0] // 2 - 5), label, fill="black", font=font)
    y += block.shape[0] + gap
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  out.save(path, format="PNG")
  return path
