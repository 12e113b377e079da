"""Images on the host: [-1, 1] -> uint8, grids as PNG files, originals beside reconstructions."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image


def to_uint8(images) -> np.ndarray:
  """Float images in [-1, 1] -> uint8 by clip((x + 1) * 127.5, 0, 255) truncated (as upstream's
  decode and train.common.to_uint8; computed in float32 so both agree bit for bit)."""
  x = np.asarray(images, np.float32)
  return np.clip((x + np.float32(1.0)) * np.float32(127.5), 0, 255).astype(np.uint8)


def _as_batch(images) -> np.ndarray:
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise ValueError(f"images must be uint8, got {images.dtype} (use to_uint8 for [-1, 1] floats)")
  if images.ndim == 3:  # [N, H, W] grayscale
    images = images[..., None]
  if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.shape[0] == 0:
    raise ValueError(f"images must be a non-empty batch [N, H, W, 3] (or 1 channel), "
                     f"got shape {images.shape}")
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  return images


def make_grid(images, ncols: int = 8, pad: int = 2, upscale: int = 1,
              pad_value: int = 255) -> np.ndarray:
  """uint8 [N, H, W, 3] -> one uint8 image [rows * (H + pad) + pad, ncols * (W + pad) + pad, 3]
  (before upscaling), filled row by row, `pad` pixels of `pad_value` around every tile; each pixel
  is then repeated `upscale` times in both directions (nearest neighbour)."""
  images = _as_batch(images)
  n, h, w, c = images.shape
  ncols = max(1, min(int(ncols), n))
  nrows = -(-n // ncols)
  grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), pad_value, np.uint8)
  for i, im in enumerate(images):
    r, col = divmod(i, ncols)
    y, x = pad + r * (h + pad), pad + col * (w + pad)
    grid[y:y + h, x:x + w] = im
  if upscale > 1:
    grid = np.repeat(np.repeat(grid, upscale, axis=0), upscale, axis=1)
  return grid


def save_grid(images, path: str, ncols: int = 8, pad: int = 2, upscale: int = 1) -> str:
  """Writes uint8 images [N, H, W, 3] as a PNG grid of `ncols` columns (see make_grid); returns
  the path. The PNG is (rows * (H + pad) + pad) * upscale high and (ncols * (W + pad) + pad) *
  upscale wide, where ncols is capped at N."""
  grid = make_grid(images, ncols=ncols, pad=pad, upscale=upscale)
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(grid).save(path, format="PNG")
  return path


def side_by_side(originals, reconstructions, per_row: int = 8) -> np.ndarray:
  """Interleaves rows of originals and their reconstructions for a grid of `per_row` columns.

  Returns uint8 [2 * ceil(N / per_row) * per_row, H, W, 3]: per_row originals, then their
  per_row reconstructions underneath, and so on; a last partial row is padded with white images so
  that each reconstruction stays under its original. Save with save_grid(..., ncols=per_row).
  """
  a, b = _as_batch(originals), _as_batch(reconstructions)
  if a.shape != b.shape:
    raise ValueError(f"originals {a.shape} and reconstructions {b.shape} differ in shape")
  per_row = max(1, min(int(per_row), a.shape[0]))
  n = a.shape[0]
  rows = -(-n // per_row)
  blank = np.full((rows * per_row - n,) + a.shape[1:], 255, np.uint8)
  a = np.concatenate([a, blank]).reshape(rows, 1, per_row, *a.shape[1:])
  b = np.concatenate([b, blank]).reshape(rows, 1, per_row, *b.shape[1:])
  return np.concatenate([a, b], axis=1).reshape(-1, *a.shape[3:])
