"""Per-example augmentations of uint8 images (numpy + PIL), as upstream's torchvision transforms.

Named sets (upstream §1; every resize is PIL bicubic, as torchvision's interpolation=3):
  "default": RandomResizedCrop(size, scale=(0.08, 1), ratio=(3/4, 4/3)) + horizontal flip.
  "strong":  RandomResizedCrop(size, scale=(0.8, 1)) + horizontal flip.
  "weak":    Resize(size) (short side) + RandomCrop(size) + horizontal flip.
  "none":    Resize(size) + CenterCrop(size) (evaluation; identity on a square image of that size).
  "flip":    "none" + horizontal flip (a mild setting for the built-in 32x32 data).
Randomness comes from a numpy Generator given by the caller (grain's ``random_map`` hands one per
example), so the pipeline is deterministic.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
from PIL import Image

AUGMENTATIONS = ("default", "strong", "weak", "none", "flip")


def ensure_rgb(image: np.ndarray) -> np.ndarray:
  """uint8 [H,W], [H,W,1], [H,W,3] or [H,W,4] -> uint8 [H,W,3] (grey repeated, alpha dropped)."""
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.shape[-1] == 1:
    return np.repeat(image, 3, axis=-1)
  return image[..., :3]


def resize(image: np.ndarray, height: int, width: int, nearest: bool = False) -> np.ndarray:
  """PIL resize (bicubic; nearest for label maps) of uint8 [H,W,3] or [H,W] -> [height,width,...]
  (identity if the size is already right)."""
  if image.shape[:2] == (height, width):
    return image
  return np.asarray(Image.fromarray(image).resize((width, height),
                                                  Image.NEAREST if nearest else Image.BICUBIC))


def resize_short_side(image: np.ndarray, size: int, nearest: bool = False) -> np.ndarray:
  """torchvision Resize(int): short side -> size, long side -> int(size * long / short)."""
  h, w = image.shape[:2]
  if h <= w:
    return resize(image, size, int(size * w / h), nearest)
  return resize(image, int(size * h / w), size, nearest)


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """torchvision CenterCrop(size) of an image at least size x size: offsets round((H-size)/2)."""
  h, w = image.shape[:2]
  if h < size or w < size:
    raise ValueError(f"center_crop: image {h}x{w} smaller than {size}")
  top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
  return image[top:top + size, left:left + size]


def resize_center_crop(image: np.ndarray, size: int, nearest: bool = False) -> np.ndarray:
  """Resize(size) then CenterCrop(size): uint8 [H,W,3] -> uint8 [size,size,3]."""
  return center_crop(resize_short_side(image, size, nearest), size)


def random_resized_crop_box(rng: np.random.Generator, height: int, width: int,
                            scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """torchvision RandomResizedCrop.get_params: returns (top, left, h, w).

  Up to 10 tries of area ~ U(scale) * H * W and log-aspect ~ U(log ratio); the first box that fits
  is placed uniformly. Otherwise the whole image, clamped to the ratio range, centred.
  """
  area = height * width
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_lo, log_hi))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    h, w = height, width
  return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(image: np.ndarray, rng: np.random.Generator, size: int,
                        scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> np.ndarray:
  """Crop a random_resized_crop_box, then PIL bicubic resize: uint8 [H,W,3] -> [size,size,3]."""
  top, left, h, w = random_resized_crop_box(rng, image.shape[0], image.shape[1], scale, ratio)
  return resize(image[top:top + h, left:left + w], size, size)


def random_crop(image: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
  """torchvision RandomCrop(size) without padding: uint8 [H,W,3] -> [size,size,3]."""
  h, w = image.shape[:2]
  top = int(rng.integers(0, h - size + 1))
  left = int(rng.integers(0, w - size + 1))
  return image[top:top + size, left:left + size]


def horizontal_flip(image: np.ndarray, rng: np.random.Generator, p: float = 0.5) -> np.ndarray:
  """Mirrors left-right with probability p (one rng.random() draw): [H,W,C] -> [H,W,C]."""
  return image[:, ::-1] if rng.random() < p else image


def augment(image: np.ndarray, rng: np.random.Generator | None, size: int,
            name: str) -> np.ndarray:
  """Applies the named augmentation set: uint8 [H,W,C] -> contiguous uint8 [size,size,3].

  ``rng`` may be None for "none" only.
  """
  return augment_with_segmentation(image, None, rng, size, name)[0]


def augment_with_segmentation(image: np.ndarray, segmentation: np.ndarray | None,
                              rng: np.random.Generator | None, size: int, name: str
                              ) -> tuple[np.ndarray, np.ndarray | None]:
  """The named augmentation applied alike to an image and its label map.

  Args:
    image: uint8 [H,W,C]; segmentation: uint8 [H,W] or [H,W,1] label map, or None.
    rng, size, name: as in ``augment`` (the same draws, so the image is the same as augment's).

  Returns:
    (uint8 [size,size,3], uint8 [size,size] or None); the label map is cropped and flipped like the
    image and resized with nearest neighbour.
  """
  image = ensure_rgb(image)
  seg = None if segmentation is None else np.asarray(segmentation).reshape(image.shape[:2])

  def both(fn):  # fn(array, nearest) applied to the current image and label map.
    return fn(image, False), None if seg is None else fn(seg, True)

  if name not in AUGMENTATIONS:
    raise ValueError(f"unknown augmentation {name!r}; choose from {AUGMENTATIONS}")
  if name in ("none", "flip"):
    image, seg = both(lambda x, nn: resize_center_crop(x, size, nn))
  elif name in ("default", "strong"):
    scale = (0.08, 1.0) if name == "default" else (0.8, 1.0)
    top, left, h, w = random_resized_crop_box(rng, image.shape[0], image.shape[1], scale)
    image, seg = both(lambda x, nn: resize(x[top:top + h, left:left + w], size, size, nn))
  elif name == "weak":
    image, seg = both(lambda x, nn: resize_short_side(x, size, nn))
    top = int(rng.integers(0, image.shape[0] - size + 1))
    left = int(rng.integers(0, image.shape[1] - size + 1))
    image, seg = both(lambda x, nn: x[top:top + size, left:left + size])
  if name != "none" and rng.random() < 0.5:  # horizontal_flip's law.
    image, seg = both(lambda x, nn: x[:, ::-1])
  return np.ascontiguousarray(image), None if seg is None else np.ascontiguousarray(seg)


def make_augmentation(name: str, size: int) -> Callable[[np.ndarray, np.random.Generator],
                                                         np.ndarray]:
  """``fn(image, rng) -> uint8 [size,size,3]`` for a named set (validated now, not at first use)."""
  if name not in AUGMENTATIONS:
    raise ValueError(f"unknown augmentation {name!r}; choose from {AUGMENTATIONS}")
  return lambda image, rng: augment(image, rng, size, name)
