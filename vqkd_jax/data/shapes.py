"""The built-in procedural dataset: coloured shapes over low-amplitude background nuisance.

Semantic content defines the class and the caption: 4 shapes x 3 colours = 12 classes, and the
object's position (in thirds of the image) is in the caption. Pixel-level nuisance does not: a smooth
colour field (amplitude ~0.15), a random grating (0.05-0.1) and pixel noise (0.05) around a random
grey, plus jitter of the object's size, position and colour. A tokenizer that spends its codes on
texture and one that spends them on objects therefore differ (`miniature-study.md`).

Every example is a pure function of (seed, split, index).
"""

from __future__ import annotations

import numpy as np

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {"red": (0.85, 0.15, 0.15), "green": (0.15, 0.72, 0.2), "blue": (0.15, 0.3, 0.9)}
CLASS_NAMES = tuple(f"{c} {s}" for s in SHAPES for c in COLOURS)
NUM_CLASSES = len(CLASS_NAMES)
SPLITS = {"train": 0, "validation": 1, "test": 2}
_ROWS = ("top", "middle", "bottom")
_COLS = ("left", "center", "right")


def class_of(shape: str, colour: str) -> int:
  return SHAPES.index(shape) * len(COLOURS) + list(COLOURS).index(colour)


def random_background(rng: np.random.Generator, size: int, scale: float = 1.0) -> np.ndarray:
  """Nuisance background, float32 [size, size, 3] in [0, 1]; `scale` multiplies its amplitudes
  (0 gives a flat grey)."""
  yy, xx = np.meshgrid(np.linspace(0, 1, size, dtype=np.float32),
                       np.linspace(0, 1, size, dtype=np.float32), indexing="ij")
  base = rng.uniform(0.35, 0.65)
  field = np.zeros((size, size, 3), np.float32)
  for _ in range(3):  # Smooth colour field: a few low-frequency waves per channel.
    fy, fx = rng.uniform(0.5, 2.0, 2)
    phase = rng.uniform(0, 2 * np.pi, 3)
    wave = np.sin(2 * np.pi * (fy * yy + fx * xx))[..., None]
    field += np.cos(phase)[None, None] * wave + np.sin(phase)[None, None] * np.cos(
        2 * np.pi * (fx * yy - fy * xx))[..., None]
  field *= 0.15 / 3
  angle, freq = rng.uniform(0, np.pi), rng.uniform(3, 8)
  grating = rng.uniform(0.05, 0.1) * np.sin(
      2 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy) + rng.uniform(0, 2 * np.pi))
  noise = 0.05 * rng.standard_normal((size, size, 3)).astype(np.float32)
  return np.clip(base + scale * (field + grating[..., None] + noise), 0, 1).astype(np.float32)


def object_mask(shape: str, cy: float, cx: float, radius: float, size: int,
                supersample: int = 2) -> np.ndarray:
  """Anti-aliased coverage [size, size] in [0, 1] of a shape centred at (cy, cx) (pixels)."""
  n = size * supersample
  coords = (np.arange(n, dtype=np.float32) + 0.5) / supersample
  y, x = np.meshgrid(coords, coords, indexing="ij")
  dy, dx = (y - cy) / radius, (x - cx) / radius
  if shape == "circle":
    m = dy ** 2 + dx ** 2 <= 1.0
  elif shape == "square":
    m = (np.abs(dy) <= 0.8) & (np.abs(dx) <= 0.8)
  elif shape == "triangle":  # Upward, base at dy = 0.8, apex at dy = -0.9.
    m = (dy <= 0.8) & (np.abs(dx) <= (dy + 0.9) / 1.7)
  elif shape == "cross":
    m = ((np.abs(dy) <= 0.3) & (np.abs(dx) <= 1.0)) | ((np.abs(dx) <= 0.3) & (np.abs(dy) <= 1.0))
  else:
    raise ValueError(f"unknown shape {shape!r}")
  return m.reshape(size, supersample, size, supersample).mean(axis=(1, 3)).astype(np.float32)


def caption_for(shape: str, colour: str, cy: float, cx: float, size: int) -> str:
  row, col = _ROWS[min(int(3 * cy / size), 2)], _COLS[min(int(3 * cx / size), 2)]
  where = "the center" if (row, col) == ("middle", "center") else (
      f"the {row}" if col == "center" else f"the {col}" if row == "middle" else f"the {row} {col}")
  return f"a {colour} {shape} at {where}"


def render_example(seed: int, split: str, index: int, image_size: int = 32,
                   nuisance: float = 1.0) -> dict:
  """{"image": uint8 [S, S, 3], "label": int, "caption": str} for example `index` of `split`."""
  rng = np.random.default_rng([seed, SPLITS[split], index])
  label = int(rng.integers(NUM_CLASSES))
  shape, colour = SHAPES[label // len(COLOURS)], list(COLOURS)[label % len(COLOURS)]
  s = image_size
  radius = rng.uniform(0.2, 0.3) * s
  margin = radius * 1.05
  cy, cx = rng.uniform(margin, s - margin, 2)
  background = random_background(rng, s, nuisance)
  rgb = np.clip(np.array(COLOURS[colour], np.float32) + rng.uniform(-0.06, 0.06, 3), 0, 1)
  mask = object_mask(shape, cy, cx, radius, s)[..., None]
  shading = 1 + 0.03 * rng.standard_normal((s, s, 1)).astype(np.float32)  # Slight texture.
  image = (1 - mask) * background + mask * np.clip(rgb * shading, 0, 1)
  return {"image": np.round(image * 255).astype(np.uint8), "label": label,
          "caption": caption_for(shape, colour, cy, cx, s)}
