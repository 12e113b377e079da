"""Per-example augmentations on uint8 images (numpy + PIL), as upstream's torchvision transforms.

Named sets (upstream §1): "default" RandomResizedCrop(0.08-1) + flip; "strong" RandomResizedCrop
(0.8-1) + flip; "weak" resize (short side) + random crop + flip; "none" resize + centre crop. All
resizes are PIL bicubic.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

AUGMENTATIONS = ("default", "strong", "weak", "none")


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  if image.shape[:2] == (height, width):
    return image
  return np.asarray(Image.fromarray(image).resize((width, height), Image.BICUBIC))


def resize_short_side(image: np.ndarray, size: int) -> np.ndarray:
  """Resizes so that the shorter side is `size` (torchvision Resize(int) rounding)."""
  h, w = image.shape[:2]
  if h <= w:
    return _resize(image, size, int(size * w / h))
  return _resize(image, int(size * h / w), size)


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
  h, w = image.shape[:2]
  top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
  return image[top:top + size, left:left + size]


def resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """Resize(size) then CenterCrop(size): the evaluation transform."""
  return center_crop(resize_short_side(image, size), size)


def random_resized_crop_box(rng: np.random.Generator, height: int, width: int,
                            scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """torchvision's RandomResizedCrop.get_params: (top, left, h, w); 10 tries, then a centre crop
  clamped to the ratio range."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(image: np.ndarray, rng: np.random.Generator, size: int,
                        scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> np.ndarray:
  top, left, h, w = random_resized_crop_box(rng, *image.shape[:2], scale=scale, ratio=ratio)
  return _resize(image[top:top + h, left:left + w], size, size)


def horizontal_flip(image: np.ndarray, rng: np.random.Generator, p: float = 0.5) -> np.ndarray:
  return image[:, ::-1] if rng.uniform() < p else image


def augment(image: np.ndarray, rng: np.random.Generator, size: int, name: str) -> np.ndarray:
  """Applies the named augmentation set to a uint8 [H, W, 3] image -> uint8 [size, size, 3]."""
  if name == "none":
    return np.ascontiguousarray(resize_center_crop(image, size))
  if name == "default":
    out = random_resized_crop(image, rng, size, (0.08, 1.0))
  elif name == "strong":
    out = random_resized_crop(image, rng, size, (0.8, 1.0))
  elif name == "weak":
    resized = resize_short_side(image, size)
    h, w = resized.shape[:2]
    top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    out = resized[top:top + size, left:left + size]
  elif name == "flip":
    out = resize_center_crop(image, size)
  else:
    raise ValueError(f"unknown augmentation {name!r}; choose from {AUGMENTATIONS + ('flip',)}")
  return np.ascontiguousarray(horizontal_flip(out, rng))
