"""`vqkd_shapes`: the built-in dataset (data/shapes.py) as a tfds builder in ArrayRecord format.

Prepared without TensorFlow: images are handed to tfds as PNG bytes encoded with PIL and the
DatasetInfo is built directly. Prepared on first use and cached under ``data_dir``:
``DATA_DIR/vqkd_shapes/<config>/<version>/``. Configs: "32" (default; 20,000 train / 2,000
validation), "64" (64x64) and "32_small" (2,000 / 500; quick runs). The generator seed is part of
the config; bump VERSION whenever data/shapes.py changes what it renders.
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
_RENDER_CHUNK = 1024


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
  """Builder config: image side, generator seed and split sizes."""
  image_size: int = 32
  seed: int = SEED
  num_train: int = 20_000
  num_validation: int = 2_000


class VqkdShapes(tfds.core.GeneratorBasedBuilder):
  """Coloured shapes (12 classes = 4 shapes x 3 colours) with captions over background nuisance."""

  name = "vqkd_shapes"
  VERSION = tfds.core.Version("2.0.0")
  RELEASE_NOTES = {
      "1.0.0": "First release.",
      "2.0.0": ("Vectorised generator: analytic anti-aliasing, 3x3 layout cells, size words; "
                "segmentation feature."),
  }
  BUILDER_CONFIGS = [
      ShapesConfig(name="32", image_size=32),
      ShapesConfig(name="64", image_size=64),
      ShapesConfig(name="32_small", image_size=32, num_train=2_000, num_validation=500),
      ShapesConfig(name="64_small", image_size=64, num_train=2_000, num_validation=500),
  ]
  DEFAULT_CONFIG_NAME = "32"

  def _info(self) -> tfds.core.DatasetInfo:
    s = self.builder_config.image_size
    return tfds.core.DatasetInfo(
        builder=self,
        description=("Procedural coloured shapes (4 shapes x 3 colours) with English captions "
                     "saying size, colour, shape and place, over low-amplitude background "
                     "nuisance (vqkd_jax/data/shapes.py)."),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(s, s, 3), encoding_format="png"),
            "label": tfds.features.ClassLabel(names=list(shapes.CLASS_NAMES)),
            "caption": tfds.features.Text(),
            # 0 = background, label + 1 on the object (for dense teacher targets).
            "segmentation": tfds.features.Image(shape=(s, s, 1), encoding_format="png"),
        }),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    c = self.builder_config
    return {"train": self._generate_examples("train", c.num_train),
            "validation": self._generate_examples("validation", c.num_validation)}

  def _generate_examples(self, split: str, count: int):
    c = self.builder_config
    for start in range(0, count, _RENDER_CHUNK):
      indices = range(start, min(start + _RENDER_CHUNK, count))
      batch = shapes.render_batch(c.seed, split, indices, c.image_size)
      for j, i in enumerate(indices):
        buf = io.BytesIO()
        Image.fromarray(batch["image"][j]).save(buf, format="PNG", compress_level=1)
        seg = io.BytesIO()
        Image.fromarray(batch["segmentation"][j]).save(seg, format="PNG", compress_level=1)
        yield i, {"image": buf.getvalue(), "label": int(batch["label"][j]),
                  "caption": batch["caption"][j], "segmentation": seg.getvalue()}


def config_name(image_size: int, small: bool = False) -> str:
  """Name of the built-in config for an image size ("32", "64", "32_small", "64_small")."""
  name = f"{image_size}_small" if small else str(image_size)
  if name not in {c.name for c in VqkdShapes.BUILDER_CONFIGS}:
    raise ValueError(f"no built-in vqkd_shapes config {name!r}: image sizes 32 and 64, each "
                     "also small")
  return name


def shapes_builder(data_dir: str, image_size: int = 32, small: bool = False,
                   config: ShapesConfig | None = None) -> VqkdShapes:
  """The (not necessarily prepared) builder for a config under data_dir."""
  return VqkdShapes(config=config or config_name(image_size, small),
                    data_dir=os.path.expanduser(data_dir))


def load_shapes(data_dir: str, image_size: int = 32, small: bool = False,
                config: ShapesConfig | None = None) -> dict:
  """Random-access sources of the built-in dataset, prepared on first use (then cached).

  Args:
    data_dir: tfds data directory (``~`` expanded).
    image_size: 32 or 64 (selects the built-in config).
    small: the 2,000 / 500 examples config.
    config: an explicit ShapesConfig instead (custom sizes/seeds, tests).

  Returns:
    {"train": source, "validation": source}; ``source[i]`` is
    {"image": uint8 [S,S,3], "label": int, "caption": bytes, "segmentation": uint8 [S,S,1]}
    (0 = background, label + 1 on the object) and ``len(source)`` its size.
  """
  builder = shapes_builder(data_dir, image_size, small, config)
  if not builder.is_prepared():
    t = time.time()
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    log.info("prepared %s in %.1f s", builder.info.full_name, time.time() - t)
  return {split: builder.as_data_source(split=split) for split in ("train", "validation")}


def prepare_main(data_dir: str, image_size: int = 32, small: bool = False) -> dict:
  """`vqkd data prepare`: prepares (or finds) the dataset, prints what is where and timings.

  Returns {"path", "prepared" (False if it was cached), "seconds", "train", "validation"}.
  """
  builder = shapes_builder(data_dir, image_size, small)
  cached = builder.is_prepared()
  t = time.time()
  splits = load_shapes(data_dir, image_size, small)
  seconds = time.time() - t
  t = time.time()
  first = splits["train"][0]
  read_ms = (time.time() - t) * 1e3
  path = str(builder.data_path)
  print(f"vqkd_shapes/{builder.builder_config.name} {builder.version} "
        f"({'cached' if cached else f'prepared in {seconds:.1f} s'}) at {path}")
  for name, src in splits.items():
    print(f"  {name}: {len(src)} examples")
  print(f"  example 0: image {first['image'].shape} {first['image'].dtype}, label "
        f"{shapes.CLASS_NAMES[int(first['label'])]!r}, caption "
        f"{np.asarray(first['caption']).item()!r} (read in {read_ms:.1f} ms)")
  return {"path": path, "prepared": not cached, "seconds": seconds,
          **{k: len(v) for k, v in splits.items()}}
