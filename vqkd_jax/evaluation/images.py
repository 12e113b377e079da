"""Image grids as PNG files."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image


def save_grid(images: np.ndarray, path: str, ncols: int = 8, pad: int = 2, upscale: int = 1) -> None:
  """Writes uint8 images [N, H, W, 3] as a grid of `ncols` columns with `pad` white pixels between."""
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise ValueError(f"save_grid wants uint8 images, got {images.dtype}")
  n, h, w, c = images.shape
  ncols = max(1, min(ncols, n))
  nrows = -(-n // ncols)
  grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, np.uint8)
  for i, im in enumerate(images):
    r, col = divmod(i, ncols)
    y, x = pad + r * (h + pad), pad + col * (w + pad)
    grid[y:y + h, x:x + w] = im
  img = Image.fromarray(grid)
  if upscale > 1:
    img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  img.save(path)
