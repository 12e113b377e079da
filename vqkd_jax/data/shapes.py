"""Procedural shapes dataset: one coloured shape over a low-amplitude, high-entropy background.

Every example is fully determined by ``(seed, split, index)``. Classes are semantic content only:
4 shapes x 3 colours = 12 classes (``label = shape * 3 + colour``). Position (a 3x3 layout cell) and
size are nuisance for the class but are described by the caption ("a large red triangle at the top
left"), so an image-understanding teacher has spatial semantics to learn.

The background is a mid-grey base plus a smooth colour field (amplitude ~0.15), a random sinusoidal
grating (0.05-0.1) and pixel noise (sigma ~0.04): high entropy, low amplitude, so a pixel tokenizer
spends codes on it while object colour and shape stay clearly recognisable.

Only numpy is imported here (no tfds / grain).
"""

from __future__ import annotations

import zlib
from typing import Sequence

import numpy as np

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = ("red", "green", "blue")
CLASS_NAMES = [f"{c} {s}" for s in SHAPES for c in COLOURS]
NUM_CLASSES = len(CLASS_NAMES)
# 3x3 layout cells (row, col) -> words used in the caption.
_ROW_WORDS = ("top", "middle", "bottom")
_COL_WORDS = ("left", "centre", "right")
POSITION_NAMES = (
    "at the top left", "at the top", "at the top right",
    "on the left", "in the centre", "on the right",
    "at the bottom left", "at the bottom", "at the bottom right",
)

# Object geometry, in fractions of the image side.
HALF_SIZE_RANGE = (0.14, 0.22)
ANGLE_JITTER_DEG = 12.0
# Nuisance amplitudes (image values in [0, 1]).
BASE_GREY_RANGE = (0.38, 0.62)
FIELD_GRID = 4          # colour field: FIELD_GRID x FIELD_GRID control points, bilinear.
FIELD_AMPLITUDE = 0.15
GRATING_AMPLITUDE_RANGE = (0.05, 0.10)
GRATING_FREQ_RANGE = (2.0, 8.0)    # cycles per image side.
NOISE_SIGMA_RANGE = (0.03, 0.05)
# Object colours: dominant channel high, the two others low (per-example jitter).
OBJECT_MAIN_RANGE = (0.75, 0.95)
OBJECT_OTHER_RANGE = (0.05, 0.22)

_CHUNK_PIXELS = 256 * 32 * 32  # examples per vectorised chunk: this many pixels.


def split_id(split: str) -> int:
  """Stable 32-bit integer for a split name (crc32), used in per-example seeding."""
  return zlib.crc32(split.encode("utf-8")) & 0xFFFFFFFF


def example_rng(seed: int, split: str, index: int) -> np.random.Generator:
  """The numpy Generator that determines example ``index`` of ``split`` under ``seed``."""
  return np.random.default_rng([int(seed), split_id(split), int(index)])


# ----------------------------------------------------------------------------------------------
# Parameter sampling (per example, from its own rng).


def _sample_background_params(rng: np.random.Generator, image_size: int) -> dict:
  """Draws the background parameters; the pixel noise array (last draw) depends on image_size."""
  p = {}
  p["base"] = np.float32(rng.uniform(*BASE_GREY_RANGE))
  p["field"] = rng.uniform(-FIELD_AMPLITUDE, FIELD_AMPLITUDE,
                           (FIELD_GRID, FIELD_GRID, 3)).astype(np.float32)
  p["grat_amp"] = np.float32(rng.uniform(*GRATING_AMPLITUDE_RANGE))
  p["grat_freq"] = np.float32(rng.uniform(*GRATING_FREQ_RANGE))
  p["grat_theta"] = np.float32(rng.uniform(0.0, np.pi))
  p["grat_phase"] = np.float32(rng.uniform(0.0, 2 * np.pi))
  p["grat_colour"] = (1.0 + 0.5 * rng.uniform(-1.0, 1.0, 3)).astype(np.float32)
  p["noise_sigma"] = np.float32(rng.uniform(*NOISE_SIGMA_RANGE))
  return p


def _sample_object_params(rng: np.random.Generator) -> dict:
  """Draws class, layout cell, geometry and colour of the object (independent of image size)."""
  p = {}
  shape = int(rng.integers(len(SHAPES)))
  colour = int(rng.integers(len(COLOURS)))
  cell = int(rng.integers(9))
  half = float(rng.uniform(*HALF_SIZE_RANGE))
  row, col = divmod(cell, 3)
  centre = []
  for k in (row, col):
    lo_valid, hi_valid = half + 0.02, 1.0 - half - 0.02
    lo = max(k / 3.0, lo_valid)
    hi = min((k + 1) / 3.0, hi_valid)
    centre.append(rng.uniform(lo, hi))
  rgb = rng.uniform(*OBJECT_OTHER_RANGE, 3)
  rgb[colour] = rng.uniform(*OBJECT_MAIN_RANGE)
  angle = np.deg2rad(rng.uniform(-ANGLE_JITTER_DEG, ANGLE_JITTER_DEG))
  p.update(shape=shape, colour=colour, cell=cell, half=np.float32(half),
           cy=np.float32(centre[0]), cx=np.float32(centre[1]),
           rgb=rgb.astype(np.float32), angle=np.float32(angle))
  return p


def _sample_example(seed: int, split: str, index: int, image_size: int):
  rng = example_rng(seed, split, index)
  obj = _sample_object_params(rng)
  bg = _sample_background_params(rng, image_size)
  noise = rng.standard_normal((image_size, image_size, 3), dtype=np.float32)
  return obj, bg, noise


def caption_for(shape: int, colour: int, cell: int, half: float) -> str:
  """English caption: size word (small/large, none in the middle third), colour, shape, place."""
  lo, hi = HALF_SIZE_RANGE
  t = (half - lo) / (hi - lo)
  size_word = "small " if t < 1 / 3 else ("large " if t >= 2 / 3 else "")
  return f"a {size_word}{COLOURS[colour]} {SHAPES[shape]} {POSITION_NAMES[cell]}"


# ----------------------------------------------------------------------------------------------
# Vectorised rendering (elementwise only, so results do not depend on batch composition).


def _stack(dicts: Sequence[dict], key: str) -> np.ndarray:
  return np.stack([np.asarray(d[key]) for d in dicts])


def _pixel_coords(image_size: int) -> tuple[np.ndarray, np.ndarray]:
  c = ((np.arange(image_size, dtype=np.float32) + 0.5) / image_size).astype(np.float32)
  return c[None, :, None], c[None, None, :]  # y [1,H,1], x [1,1,W]


def _render_backgrounds(bgs: Sequence[dict], noises: np.ndarray, image_size: int,
                        nuisance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Returns (background without noise [B,H,W,3], scaled noise [B,H,W,3]), float32."""
  s = image_size
  b = len(bgs)
  nuis = nuisance.reshape(b, 1, 1, 1).astype(np.float32)
  base = _stack(bgs, "base").reshape(b, 1, 1, 1)
  # Bilinear colour field from FIELD_GRID^2 control points (corner-aligned).
  pos = (np.arange(s, dtype=np.float32) + 0.5) / s * (FIELD_GRID - 1)
  i0 = np.minimum(np.floor(pos).astype(np.int64), FIELD_GRID - 2)
  w = (pos - i0).astype(np.float32)
  field = _stack(bgs, "field")  # [B,G,G,3]
  wx = w[None, None, :, None]
  rows = field[:, :, i0] * (1 - wx) + field[:, :, i0 + 1] * wx  # [B,G,S,3], along x
  wy = w[None, :, None, None]
  colour_field = rows[:, i0] * (1 - wy) + rows[:, i0 + 1] * wy  # [B,S,S,3], along y
  # Grating.
  y, x = _pixel_coords(s)
  theta = _stack(bgs, "grat_theta").reshape(b, 1, 1)
  freq = _stack(bgs, "grat_freq").reshape(b, 1, 1)
  phase = _stack(bgs, "grat_phase").reshape(b, 1, 1)
  amp = _stack(bgs, "grat_amp").reshape(b, 1, 1, 1)
  arg = (2 * np.pi * freq * (x * np.cos(theta) + y * np.sin(theta)) + phase).astype(np.float64)
  grating = np.sin(arg).astype(np.float32)[..., None] * amp * _stack(bgs, "grat_colour")[:, None,
                                                                                       None, :]
  background = base + nuis * (colour_field + grating)
  sigma = _stack(bgs, "noise_sigma").reshape(b, 1, 1, 1)
  return background.astype(np.float32), (noises * sigma * nuis).astype(np.float32)


def _shape_sdf(shape: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Signed distance (approximate, units of the half size) of shape ids [B,1,1] at (u, v)."""
  au, av = np.abs(u), np.abs(v)
  circle = np.sqrt(u * u + v * v) - 1.0
  square = np.maximum(au, av) - 0.8
  # Equilateral triangle pointing up (y down), circumradius 1.2 (inradius 0.6), shifted down by 0.3
  # so that it spans v in [-0.9, 0.9] like the other shapes.
  vt = v - 0.3
  tri = np.maximum.reduce([vt - 0.6,
                           -0.8660254 * u - 0.5 * vt - 0.6,
                           0.8660254 * u - 0.5 * vt - 0.6])
  cross = np.minimum(np.maximum(au - 0.92, av - 0.3), np.maximum(au - 0.3, av - 0.92))
  return np.select([shape == 0, shape == 1, shape == 2], [circle, square, tri], cross)


def _object_alpha(objs: Sequence[dict], image_size: int) -> np.ndarray:
  """Anti-aliased coverage [B,H,W] of each object (analytic: clip(0.5 - sdf_in_pixels, 0, 1))."""
  b = len(objs)
  y, x = _pixel_coords(image_size)
  cx = _stack(objs, "cx").reshape(b, 1, 1)
  cy = _stack(objs, "cy").reshape(b, 1, 1)
  half = _stack(objs, "half").reshape(b, 1, 1)
  ang = _stack(objs, "angle").reshape(b, 1, 1)
  shape = _stack(objs, "shape").reshape(b, 1, 1)
  dx, dy = x - cx, y - cy
  c, s = np.cos(ang), np.sin(ang)
  u = (c * dx + s * dy) / half
  v = (-s * dx + c * dy) / half
  sdf_px = _shape_sdf(shape, u, v) * half * image_size
  return np.clip(0.5 - sdf_px, 0.0, 1.0).astype(np.float32)


def _to_uint8(x: np.ndarray) -> np.ndarray:
  return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def _render_chunk(seed, split, indices, image_size, nuisance, return_meta):
  samples = [_sample_example(seed, split, i, image_size) for i in indices]
  objs = [o for o, _, _ in samples]
  bgs = [g for _, g, _ in samples]
  noises = np.stack([n for _, _, n in samples])
  nuis = np.broadcast_to(np.asarray(nuisance, np.float32), (len(indices),))
  background, noise = _render_backgrounds(bgs, noises, image_size, nuis)
  alpha = _object_alpha(objs, image_size)[..., None]
  rgb = _stack(objs, "rgb")[:, None, None, :]
  image = _to_uint8(background * (1 - alpha) + rgb * alpha + noise)
  label = np.array([o["shape"] * len(COLOURS) + o["colour"] for o in objs], np.int32)
  out = {
      "image": image,
      "label": label,
      "caption": [caption_for(o["shape"], o["colour"], o["cell"], o["half"]) for o in objs],
      "segmentation": np.where(alpha[..., 0] >= 0.5, label[:, None, None] + 1, 0).astype(np.uint8),
  }
  if return_meta:
    out["alpha"] = alpha[..., 0]
    out["cell"] = np.array([o["cell"] for o in objs], np.int32)
    out["center"] = np.array([[o["cy"], o["cx"]] for o in objs], np.float32)
    out["half_size"] = np.array([o["half"] for o in objs], np.float32)
  return out


def render_batch(seed: int, split: str, indices: Sequence[int], image_size: int = 32,
                 nuisance: float | np.ndarray = 1.0, return_meta: bool = False) -> dict:
  """Renders many examples at once (vectorised numpy).

  Args:
    seed, split: dataset identity; example ``i`` is the same as ``render_example(seed, split, i)``.
    indices: example indices (any order, repeats allowed).
    image_size: side S of the square images.
    nuisance: scale of all background nuisance (colour field, grating, pixel noise), scalar or [N];
      0 gives a flat grey background with the very same object (for evaluator augmentation).
    return_meta: also return ``alpha`` float32 [N,S,S] object coverage, ``cell`` int32 [N] layout
      cell (row*3+col), ``center`` float32 [N,2] (y, x) and ``half_size`` float32 [N] in fractions.

  Returns:
    dict(image=uint8 [N,S,S,3], label=int32 [N], caption=list[str] of N,
    segmentation=uint8 [N,S,S]: 0 = background, label + 1 where the object covers >= half a pixel).
  """
  indices = [int(i) for i in indices]
  if not indices:
    raise ValueError("render_batch needs at least one index")
  nuis = np.broadcast_to(np.asarray(nuisance, np.float32), (len(indices),))
  chunk = max(8, _CHUNK_PIXELS // (image_size * image_size))
  parts = [_render_chunk(seed, split, indices[i:i + chunk], image_size, nuis[i:i + chunk],
                         return_meta) for i in range(0, len(indices), chunk)]
  out = {}
  for k in parts[0]:
    if k == "caption":
      out[k] = [c for p in parts for c in p[k]]
    else:
      out[k] = np.concatenate([p[k] for p in parts])
  return out


def render_example(seed: int, split: str, index: int, image_size: int = 32,
                   nuisance: float = 1.0) -> dict:
  """One example. Returns dict(image=uint8 [S,S,3], label=int, caption=str,
  segmentation=uint8 [S,S] (0 = background, label + 1 on the object)).

  Fully determined by (seed, split, index, image_size, nuisance); ``nuisance`` as in
  ``render_batch``. The object (class, place, size, colour) does not depend on image_size.
  """
  out = render_batch(seed, split, [index], image_size, nuisance)
  return {"image": out["image"][0], "label": int(out["label"][0]), "caption": out["caption"][0],
          "segmentation": out["segmentation"][0]}


# ----------------------------------------------------------------------------------------------
# Nuisance-only augmentation for evaluators.


def random_background(rng: np.random.Generator, image_size: int, strength: float = 1.0,
                      with_noise: bool = True) -> np.ndarray:
  """A fresh background from the dataset's nuisance distribution.

  Args:
    rng: numpy Generator.
    image_size: side S.
    strength: nuisance scale (0 = flat grey of random level, 1 = as in the dataset).
    with_noise: add the pixel noise too (when False, add it after ``render_object_on`` yourself
      or leave it out).

  Returns:
    float32 [S,S,3] in about [0, 1] (not clipped).
  """
  bg = _sample_background_params(rng, image_size)
  noise = rng.standard_normal((1, image_size, image_size, 3), dtype=np.float32)
  background, scaled_noise = _render_backgrounds([bg], noise, image_size,
                                                 np.array([strength], np.float32))
  out = background[0]
  if with_noise:
    out = out + scaled_noise[0]
  return out


def render_object_on(background: np.ndarray, shape: int, colour: int | Sequence[float],
                     center: tuple[float, float], half_size: float, angle_deg: float = 0.0
                     ) -> np.ndarray:
  """Composites one anti-aliased object on a background.

  Args:
    background: float [S,S,3] in [0,1] (e.g. from ``random_background``) or uint8 [S,S,3].
    shape: index into SHAPES.
    colour: index into COLOURS (pure dataset-typical colour) or an explicit RGB triple in [0,1].
    center: (y, x) in fractions of the side; half_size: fraction of the side.
    angle_deg: rotation.

  Returns:
    uint8 [S,S,3].
  """
  bg = np.asarray(background)
  if bg.dtype == np.uint8:
    bg = bg.astype(np.float32) / 255.0
  s = bg.shape[0]
  if np.isscalar(colour) or np.ndim(colour) == 0:
    rgb = np.full(3, np.mean(OBJECT_OTHER_RANGE), np.float32)
    rgb[int(colour)] = np.mean(OBJECT_MAIN_RANGE)
  else:
    rgb = np.asarray(colour, np.float32)
  obj = dict(shape=int(shape), cx=np.float32(center[1]), cy=np.float32(center[0]),
             half=np.float32(half_size), angle=np.float32(np.deg2rad(angle_deg)))
  alpha = _object_alpha([obj], s)[0][..., None]
  return _to_uint8(bg * (1 - alpha) + rgb * alpha)


def parse_caption(caption: str) -> tuple[int, int, int]:
  """Inverse of the caption law: returns (label, shape, cell) parsed from a caption."""
  words = caption.split()
  colour = next(i for i, c in enumerate(COLOURS) if c in words)
  shape = next(i for i, s in enumerate(SHAPES) if s in words)
  cell = next(i for i, p in enumerate(POSITION_NAMES) if caption.endswith(p))
  return shape * len(COLOURS) + colour, shape, cell
