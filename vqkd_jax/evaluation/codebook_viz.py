"""The paper's codebook visualisation: for a sample of codes, the image patches assigned to each.

A pixel tokenizer's codes gather patches of similar colour and texture; a distilled tokenizer's gather
patches of similar meaning (the same part of the same kind of object) whatever their colour. Rows are
codes, columns the patches (the receptive cell of one token: image_size / grid pixels) assigned to it.
"""

from __future__ import annotations

import numpy as np

from vqkd_jax.evaluation.images import make_grid, save_grid


def patches_by_code(images: np.ndarray, indices: np.ndarray, codes: np.ndarray,
                    per_code: int) -> dict[int, np.ndarray]:
  """uint8 images [N, H, W, 3] and their code indices [N, h, w] -> {code: uint8 patches
  [<= per_code, H/h, W/w, 3]}: the first `per_code` cells (in image, then raster order) holding
  each code."""
  n, hh, ww, c = images.shape
  _, h, w = indices.shape
  ph, pw = hh // h, ww // w
  cells = images[:, :h * ph, :w * pw].reshape(n, h, ph, w, pw, c).transpose(0, 1, 3, 2, 4, 5)
  cells = cells.reshape(n * h * w, ph, pw, c)
  flat = indices.reshape(-1)
  return {int(k): cells[np.flatnonzero(flat == k)[:per_code]] for k in codes}


def choose_codes(indices: np.ndarray, num_codes: int, count: int, seed: int = 0) -> np.ndarray:
  """`count` codes drawn uniformly without replacement among the used ones, most used first."""
  freq = np.bincount(indices.reshape(-1), minlength=num_codes)
  used = np.flatnonzero(freq)
  rng = np.random.default_rng(seed)
  chosen = rng.choice(used, size=min(count, len(used)), replace=False)
  return chosen[np.argsort(-freq[chosen], kind="stable")]


def codebook_grid(images: np.ndarray, indices: np.ndarray, num_codes: int, num_rows: int = 12,
                  per_code: int = 12, upscale: int = 4, seed: int = 0) -> np.ndarray:
  """One uint8 image: a row of up to `per_code` patches for each of `num_rows` sampled codes (grey
  tiles where a code has fewer patches)."""
  codes = choose_codes(indices, num_codes, num_rows, seed)
  by_code = patches_by_code(images, indices, codes, per_code)
  ph, pw = images.shape[1] // indices.shape[1], images.shape[2] // indices.shape[2]
  tiles = []
  for k in codes:
    row = by_code[int(k)]
    fill = np.full((per_code - len(row), ph, pw, 3), 128, np.uint8)
    tiles.append(np.concatenate([row, fill]))
  return make_grid(np.concatenate(tiles), ncols=per_code, pad=1, upscale=upscale)


def save_codebook_grids(path: str, images: np.ndarray, tokenizers: dict, **kwargs) -> str:
  """Writes the grids of several tokenizers side by side (e.g. {"VQGAN": ..., "VQ-KD": ...}), each
  given as (indices [N, h, w], num_codes), separated by a white gap; returns the path."""
  grids = [codebook_grid(images, idx, k, **kwargs) for idx, k in tokenizers.values()]
  height = max(g.shape[0] for g in grids)
  gap = np.full((height, 16, 3), 255, np.uint8)
  parts = []
  for g in grids:
    parts += [np.pad(g, ((0, height - g.shape[0]), (0, 0), (0, 0)), constant_values=255), gap]
  return save_grid(np.concatenate(parts[:-1], axis=1)[None], path, ncols=1, pad=0)
