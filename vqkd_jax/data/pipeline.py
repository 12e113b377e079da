"""grain input pipelines over random-access data sources (tfds ArrayRecord datasets).

Training: per-process slice, seeded shuffle that changes every epoch, endless repetition,
per-example augmentation seeded by (seed, position), batching; the iterator's state is its position,
so a restored iterator continues the stream exactly. Evaluation: every example once across
processes, the last batch padded and marked by `mask`.
"""

from __future__ import annotations

import math
import os
from typing import Iterator

import grain
import jax
import numpy as np

from vqkd_jax.data.augment import augment


def load_dataset(name: str, data_dir: str, image_size: int) -> tuple[dict, int]:
  """({split: random-access source}, num_classes) for a dataset name:

  "shapes" (built-in, prepared on first use), "shapes_small" (its 2,500-example variant),
  "imagenet2012" (tfds, prepared from a manual directory, see data/imagenet.py),
  "folder:<name>" (a folder converted by `vqkd data convert-folder` into data_dir).
  """
  data_dir = os.path.expanduser(data_dir)
  if name in ("shapes", "shapes_small"):
    from vqkd_jax.data import shapes
    from vqkd_jax.data.shapes_builder import load_shapes
    return load_shapes(data_dir, image_size, small=name == "shapes_small"), shapes.NUM_CLASSES
  if name == "imagenet2012":
    from vqkd_jax.data.imagenet import load_imagenet
    return load_imagenet(data_dir)
  if name.startswith("folder:"):
    from vqkd_jax.data.image_folder import load_converted
    return load_converted(name.split(":", 1)[1], data_dir)
  raise ValueError(f"unknown dataset {name!r}: shapes, shapes_small, imagenet2012, folder:<name>")


def _example(record: dict, image_size: int, augmentation: str, rng) -> dict:
  image = np.asarray(record["image"])
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, -1)
  return {"image": augment(image[..., :3], rng, image_size, augmentation),
          "label": np.int32(record["label"])}


def _process(process_index, process_count):
  return (jax.process_index() if process_index is None else process_index,
          jax.process_count() if process_count is None else process_count)


def make_train_iterator(source, *, global_batch_size: int, image_size: int, augmentation: str,
                        seed: int, process_index: int | None = None,
                        process_count: int | None = None, num_threads: int = 4):
  """An endless iterator of this process's batches {"image" uint8 [b, S, S, 3], "label" int32 [b]}
  (b = global_batch_size / process_count), with get_state() / set_state()."""
  pi, pc = _process(process_index, process_count)
  if global_batch_size % pc:
    raise ValueError(f"global batch {global_batch_size} does not split over {pc} processes")
  ds = grain.MapDataset.source(source)[pi::pc]
  ds = ds.seed(seed).shuffle().repeat()
  ds = ds.random_map(lambda r, rng: _example(r, image_size, augmentation, rng))
  ds = ds.batch(global_batch_size // pc, drop_remainder=True)
  options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * num_threads)
  return iter(ds.to_iter_dataset(options))


def make_eval_iterator(source, *, global_batch_size: int, image_size: int,
                       process_index: int | None = None,
                       process_count: int | None = None) -> Iterator[dict]:
  """This process's evaluation batches in dataset order, resize + centre crop, with a bool `mask`
  that is False on padding. Every process yields the same number of batches."""
  pi, pc = _process(process_index, process_count)
  local = global_batch_size // pc
  n = len(source)
  per_process = math.ceil(n / pc)
  num_batches = math.ceil(per_process / local)
  indices = list(range(pi, n, pc))
  ds = grain.MapDataset.source(source)
  for b in range(num_batches):
    idx = indices[b * local:(b + 1) * local]
    examples = [_example(ds[i], image_size, "none", None) for i in idx]
    pad = local - len(examples)
    images = np.zeros((local, image_size, image_size, 3), np.uint8)
    labels = np.zeros((local,), np.int32)
    if examples:
      images[:len(examples)] = np.stack([e["image"] for e in examples])
      labels[:len(examples)] = [e["label"] for e in examples]
    yield {"image": images, "label": labels,
           "mask": np.arange(local) < local - pad}
