"""`vqkd_shapes`: the built-in dataset as a tensorflow-datasets builder in ArrayRecord format.

Prepared without TensorFlow (images handed to tfds as PNG bytes encoded with PIL) on first use and
cached under `data_dir`. Configs: "32" (default, 20,000 train / 2,000 validation), "64" (64x64), and
"32_small" (2,000 / 500; quick runs and tests).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import time

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from vqkd_jax.data import shapes

log = logging.getLogger(__name__)
SEED = 20241122


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
  image_size: int = 32
  num_train: int = 20_000
  num_validation: int = 2_000


class VqkdShapes(tfds.core.GeneratorBasedBuilder):
  """Coloured shapes (12 classes) with captions over background nuisance; see data/shapes.py."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [
      ShapesConfig(name="32", image_size=32),
      ShapesConfig(name="64", image_size=64),
      ShapesConfig(name="32_small", image_size=32, num_train=2_000, num_validation=500),
  ]
  DEFAULT_CONFIG_NAME = "32"

  def _info(self) -> tfds.core.DatasetInfo:
    s = self.builder_config.image_size
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(s, s, 3), encoding_format="png"),
            "label": tfds.features.ClassLabel(names=list(shapes.CLASS_NAMES)),
            "caption": tfds.features.Text(),
        }),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    c = self.builder_config
    return {"train": self._generate_examples("train", c.num_train),
            "validation": self._generate_examples("validation", c.num_validation)}

  def _generate_examples(self, split: str, count: int):
    for i in range(count):
      ex = shapes.render_example(SEED, split, i, self.builder_config.image_size)
      buf = io.BytesIO()
      Image.fromarray(ex["image"]).save(buf, format="PNG")
      yield i, {"image": buf.getvalue(), "label": ex["label"], "caption": ex["caption"]}


def config_name(image_size: int, small: bool = False) -> str:
  name = str(image_size)
  if small:
    name += "_small"
  if name not in {c.name for c in VqkdShapes.BUILDER_CONFIGS}:
    raise ValueError(f"no built-in dataset config {name!r}; image sizes 32 and 64 (32_small)")
  return name


def load_shapes(data_dir: str, image_size: int = 32, small: bool = False) -> dict:
  """Prepares vqkd_shapes/<config> under data_dir if needed; returns {split: data source}
  (random access, decoded numpy examples)."""
  builder = VqkdShapes(config=config_name(image_size, small), data_dir=os.path.expanduser(data_dir))
  if not builder.is_prepared():
    t = time.time()
    builder.download_and_prepare(file_format="array_record",
                                 download_config=tfds.download.DownloadConfig(
                                     verify_ssl=False, try_download_gcs=False))
    log.info("prepared %s in %.1f s", builder.info.full_name, time.time() - t)
  return {split: builder.as_data_source(split=split) for split in ("train", "validation")}


def prepare_main(data_dir: str, image_size: int) -> None:
  """`vqkd data prepare`: prepares the dataset and prints what is where."""
  t = time.time()
  splits = load_shapes(data_dir, image_size)
  print(f"vqkd_shapes/{image_size} in {os.path.expanduser(data_dir)}: "
        + ", ".join(f"{k} {len(v)}" for k, v in splits.items()) + f" ({time.time() - t:.1f} s)")
