"""Any folder of class subfolders -> an ArrayRecord tfds dataset, TF-free.

    SRC/<class_a>/*  SRC/<class_b>/* ...        (a validation fraction held out per class)
    or SRC/train/<class>/*, SRC/val|validation/<class>/*   (splits as given)
      -> OUT/converted_image_folder/<name>/1.0.0/   read back with
         load_dataset("image_folder:OUT/converted_image_folder/<name>") or ("folder:<name>", OUT)

Class ids are the sorted subfolder names. Every file is opened with PIL and fully decoded, converted
to RGB (optionally resized: short side, then centre crop) and re-encoded (PNG, or JPEG quality 95).
Files PIL cannot read (corrupt, truncated, not images) are skipped, logged by name, counted and
listed in the returned summary (also saved as conversion_summary.json beside the dataset).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import time

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from vqkd_jax.data.augment import resize_center_crop

log = logging.getLogger(__name__)
BUILDER_NAME = "converted_image_folder"
_VAL_NAMES = ("validation", "val")


@dataclasses.dataclass
class FolderConfig(tfds.core.BuilderConfig):
  """One converted folder: where from, output size (0 = keep), split law and encoding."""
  src_dir: str = ""
  image_size: int = 0
  val_fraction: float = 0.1
  encoding: str = "png"
  class_names: tuple = ()
  presplit: bool = False


class ConvertedImageFolder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A folder of class subfolders (one builder config per converted folder)."""

  name = BUILDER_NAME
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}

  def __init__(self, *args, **kwargs):
    self.skipped: list[tuple[str, str]] = []
    super().__init__(*args, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    c = self.builder_config
    shape = (c.image_size, c.image_size, 3) if c.image_size else (None, None, 3)
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"Images converted from {c.src_dir}",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=shape, encoding_format=c.encoding),
            "label": tfds.features.ClassLabel(names=list(c.class_names)),
            "file_name": tfds.features.Text(),
        }),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    c = self.builder_config
    files: dict[str, list] = {"train": [], "validation": []}
    if c.presplit:
      val_dir = next(d for d in _VAL_NAMES if os.path.isdir(os.path.join(c.src_dir, d)))
      for split, sub in (("train", "train"), ("validation", val_dir)):
        for label, cls in enumerate(c.class_names):
          for rel in _list_files(c.src_dir, os.path.join(sub, cls)):
            files[split].append((label, rel))
    else:
      for label, cls in enumerate(c.class_names):
        rels = _list_files(c.src_dir, cls)
        # Held out: the ceil(n * val_fraction) files of the class first in hash order.
        rels.sort(key=lambda r: hashlib.sha1(r.encode()).hexdigest())
        n_val = int(np.ceil(len(rels) * c.val_fraction))
        files["validation"] += [(label, r) for r in sorted(rels[:n_val])]
        files["train"] += [(label, r) for r in sorted(rels[n_val:])]
    return {split: self._generate_examples(items) for split, items in files.items() if items}

  def _generate_examples(self, items):
    c = self.builder_config
    for label, rel in items:
      try:
        with Image.open(os.path.join(c.src_dir, rel)) as im:
          image = np.asarray(im.convert("RGB"))  # convert() decodes the whole file.
      except Exception as e:  # Unreadable, corrupt or not an image: skip, log, count.
        self.skipped.append((rel, f"{type(e).__name__}: {e}"))
        log.warning("skipping %s: %s: %s", rel, type(e).__name__, e)
        continue
      if c.image_size:
        image = resize_center_crop(image, c.image_size)
      buf = io.BytesIO()
      if c.encoding == "jpeg":
        Image.fromarray(image).save(buf, format="JPEG", quality=95)
      else:
        Image.fromarray(image).save(buf, format="PNG")
      yield rel, {"image": buf.getvalue(), "label": label, "file_name": rel}


def _list_files(root: str, sub: str) -> list[str]:
  """Paths relative to root of every file under root/sub (recursively), sorted."""
  out = []
  for dirpath, dirnames, filenames in os.walk(os.path.join(root, sub)):
    dirnames.sort()
    out += [os.path.relpath(os.path.join(dirpath, f), root) for f in sorted(filenames)]
  return out


def _subdirs(path: str) -> list[str]:
  return sorted(d for d in os.listdir(path)
                if os.path.isdir(os.path.join(path, d)) and not d.startswith("."))


def convert_image_folder(src_dir: str, out_dir: str, name: str, image_size: int | None = None,
                         val_fraction: float = 0.1, encoding: str = "png",
                         overwrite: bool = False) -> dict:
  """Converts a folder of class subfolders into an ArrayRecord tfds dataset.

  Args:
    src_dir: SRC/<class>/<files> (any depth below the class folder), or SRC/train/<class>/...
      with SRC/val/<class>/... (or validation/), whose splits are kept.
    out_dir: tfds data directory; the dataset goes to out_dir/converted_image_folder/<name>/1.0.0.
    name: dataset name (a tfds config name: letters, digits, '_', '.', '-').
    image_size: if set, resize the short side to it and centre-crop (square images).
    val_fraction: fraction of each class held out as "validation" (flat layout only).
    encoding: "png" (lossless) or "jpeg" (quality 95; smaller, for large folders).
    overwrite: reconvert even if the dataset exists (otherwise it is reused).

  Returns:
    {"name", "path", "classes" (count), "class_names", "train", "validation" (example counts),
     "skipped" (count), "skipped_files": [[relative path, reason]], "seconds", "cached"}.
  """
  src_dir = os.path.abspath(os.path.expanduser(src_dir))
  out_dir = os.path.abspath(os.path.expanduser(out_dir))
  if not os.path.isdir(src_dir):
    raise FileNotFoundError(f"image folder not found: {src_dir}")
  if encoding not in ("png", "jpeg"):
    raise ValueError(f"encoding must be 'png' or 'jpeg', not {encoding!r}")
  top = _subdirs(src_dir)
  val_dir = next((d for d in _VAL_NAMES if d in top), None)
  presplit = "train" in top and val_dir is not None
  classes = tuple(_subdirs(os.path.join(src_dir, "train")) if presplit else top)
  if presplit and set(_subdirs(os.path.join(src_dir, val_dir))) - set(classes):
    raise ValueError(f"{src_dir}/{val_dir} has classes that {src_dir}/train lacks")
  if not classes:
    raise ValueError(f"{src_dir} has no class subfolders")
  config = FolderConfig(name=name, src_dir=src_dir, image_size=image_size or 0,
                        val_fraction=val_fraction, encoding=encoding, class_names=classes,
                        presplit=presplit)
  builder = ConvertedImageFolder(config=config, data_dir=out_dir)
  summary_file = os.path.join(str(builder.data_path), "conversion_summary.json")
  if builder.is_prepared() and not overwrite and os.path.exists(summary_file):
    with open(summary_file) as f:
      return dict(json.load(f), cached=True)
  t = time.time()
  builder.download_and_prepare(
      file_format="array_record",
      download_config=tfds.download.DownloadConfig(
          try_download_gcs=False,
          download_mode=(tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if overwrite
                         else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)))
  splits = {s: len(src) for s, src in load_converted(str(builder.data_path))[0].items()}
  summary = {"name": name, "path": str(builder.data_path), "classes": len(classes),
             "class_names": list(classes), **splits, "skipped": len(builder.skipped),
             "skipped_files": [list(s) for s in builder.skipped],
             "seconds": round(time.time() - t, 2)}
  with open(summary_file, "w") as f:
    json.dump(summary, f, indent=1)
  log.info("converted %s: %s", src_dir, {k: v for k, v in summary.items() if k != "class_names"})
  return dict(summary, cached=False)


def _find_version_dir(path: str) -> str | None:
  if os.path.exists(os.path.join(path, "dataset_info.json")):
    return path
  if os.path.isdir(path):
    versions = [d for d in os.listdir(path)
                if os.path.exists(os.path.join(path, d, "dataset_info.json"))]
    if versions:
      return os.path.join(path, max(versions, key=lambda v: tuple(int(x) for x in v.split("."))))
  return None


def load_converted(path_or_name: str, data_dir: str | None = None) -> tuple[dict, int]:
  """Random-access sources of a converted folder dataset (TF-free).

  Args:
    path_or_name: the dataset directory (…/converted_image_folder/<name>, or its version
      directory), or a name under data_dir/converted_image_folder/.
    data_dir: where to look a name up.

  Returns:
    ({split: source}, num_classes); ``source[i]`` is {"image": uint8 [H,W,3], "label": int64,
    "file_name": bytes}.
  """
  candidates = [os.path.expanduser(path_or_name)]
  if data_dir is not None:
    candidates.append(os.path.join(os.path.expanduser(data_dir), BUILDER_NAME, path_or_name))
  version_dir = next((v for v in map(_find_version_dir, candidates) if v), None)
  if version_dir is None:
    raise FileNotFoundError(f"no converted folder dataset at {' or '.join(candidates)}; convert "
                            "one with vqkd_jax.data.image_folder.convert_image_folder")
  builder = tfds.builder_from_directory(version_dir)
  splits = {s: builder.as_data_source(split=s) for s in builder.info.splits}
  return splits, builder.info.features["label"].num_classes
