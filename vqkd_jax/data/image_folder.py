"""Any folder of class subfolders -> an ArrayRecord tfds dataset (`vqkd data convert-folder`).

    SRC/<class_a>/*.jpg|png|...  SRC/<class_b>/...   ->   OUT/converted_image_folder/<name>/1.0.0/

Class ids are the sorted subfolder names. Every image is opened with PIL, converted to RGB
(optionally resized: short side then centre crop) and stored as PNG. Files that PIL cannot read are
skipped, counted and named in the returned summary; nothing stops on them. A deterministic fraction of
each class (the first files in file-name-hash order) goes to the validation split.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import os

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from vqkd_jax.data.augment import resize_center_crop

log = logging.getLogger(__name__)


@dataclasses.dataclass
class FolderConfig(tfds.core.BuilderConfig):
  src_dir: str = ""
  image_size: int = 0
  val_fraction: float = 0.1
  class_names: tuple = ()


class ConvertedImageFolder(tfds.core.GeneratorBasedBuilder):
  """A folder of class subfolders (one builder config per converted folder)."""

  VERSION = tfds.core.Version("1.0.0")

  def __init__(self, *args, **kwargs):
    self.skipped: list[tuple[str, str]] = []
    super().__init__(*args, **kwargs)

  def _info(self):
    c = self.builder_config
    shape = (c.image_size, c.image_size, 3) if c.image_size else (None, None, 3)
    return tfds.core.DatasetInfo(
        builder=self, description=f"Images converted from {c.src_dir}",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=shape, encoding_format="png"),
            "label": tfds.features.ClassLabel(names=list(c.class_names)),
            "file_name": tfds.features.Text()}),
        supervised_keys=("image", "label"))

  def _split_generators(self, dl_manager):
    c = self.builder_config
    files = {"train": [], "validation": []}
    for label, cls in enumerate(c.class_names):
      folder = os.path.join(c.src_dir, cls)
      names = [f for f in os.listdir(folder) if os.path.isfile(os.path.join(folder, f))]
      # Validation: the ceil(n * val_fraction) files of each class first in hash order.
      names.sort(key=lambda f: hashlib.sha1(f"{cls}/{f}".encode()).hexdigest())
      n_val = int(np.ceil(len(names) * c.val_fraction))
      for i, fname in enumerate(names):
        files["validation" if i < n_val else "train"].append((label, cls, fname))
    return {split: self._generate_examples(sorted(items, key=lambda t: (t[0], t[2])))
            for split, items in files.items()}

  def _generate_examples(self, items):
    c = self.builder_config
    for label, cls, fname in items:
      rel = f"{cls}/{fname}"
      try:
        with Image.open(os.path.join(c.src_dir, cls, fname)) as im:
          image = np.asarray(im.convert("RGB"))
      except Exception as e:  # Unreadable or corrupt: skip, count, name it.
        self.skipped.append((rel, f"{type(e).__name__}: {e}"))
        log.warning("skipping %s: %s", rel, e)
        continue
      if c.image_size:
        image = resize_center_crop(image, c.image_size)
      buf = io.BytesIO()
      Image.fromarray(image).save(buf, format="PNG")
      yield rel, {"image": buf.getvalue(), "label": label, "file_name": rel}


def convert_image_folder(src_dir: str, out_dir: str, name: str, image_size: int | None = None,
                         val_fraction: float = 0.1) -> dict:
  """Converts src_dir into out_dir; returns {"name", "train", "validation", "skipped",
  "skipped_files": [(path, reason)], "classes"}."""
  src_dir = os.path.abspath(os.path.expanduser(src_dir))
  if not os.path.isdir(src_dir):
    raise FileNotFoundError(f"image folder not found: {src_dir}")
  classes = tuple(sorted(d for d in os.listdir(src_dir) if os.path.isdir(os.path.join(src_dir, d))))
  if not classes:
    raise ValueError(f"{src_dir} has no class subfolders")
  config = FolderConfig(name=name, src_dir=src_dir, image_size=image_size or 0,
                        val_fraction=val_fraction, class_names=classes)
  builder = ConvertedImageFolder(config=config, data_dir=os.path.expanduser(out_dir))
  builder.download_and_prepare(file_format="array_record")
  splits, _ = load_converted(name, out_dir)
  return {"name": name, "classes": len(classes), "train": len(splits["train"]),
          "validation": len(splits["validation"]),
          "skipped": len(builder.skipped), "skipped_files": builder.skipped}


def load_converted(name: str, data_dir: str) -> tuple[dict, int]:
  """({split: source}, num_classes) of a folder converted under data_dir."""
  root = os.path.join(os.path.expanduser(data_dir), "converted_image_folder", name)
  versions = sorted(os.listdir(root)) if os.path.isdir(root) else []
  if not versions:
    raise FileNotFoundError(f"no converted folder dataset {name!r} in {data_dir}; run "
                            f"`vqkd data convert-folder SRC {data_dir} --name {name}`")
  builder = tfds.builder_from_directory(os.path.join(root, versions[-1]))
  splits = {s: builder.as_data_source(split=s) for s in ("train", "validation")}
  return splits, builder.info.features["label"].num_classes
