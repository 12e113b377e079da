"""The loop's view of the data: config.data -> a checkpointable iterator of per-process batches."""

from __future__ import annotations

import jax
import numpy as np


def make_train_input(config):
  """A per-process iterator of training batches (dicts of numpy arrays) with get_state/set_state.

  config.data.synthetic=True gives random batches without tfds or grain (benchmarks)."""
  d = config.data
  if d.synthetic:
    return SyntheticIterator(config.batch_size // jax.process_count(), d.image_size,
                             d.num_classes, config.seed + jax.process_index())
  from vqkd_jax.data.pipeline import load_dataset, make_train_iterator
  splits, _ = load_dataset(d.name, d.data_dir, d.image_size)
  return make_train_iterator(
      splits["train"], global_batch_size=config.batch_size, image_size=d.image_size,
      augmentation=d.augmentation, seed=config.seed)


def make_eval_input(config, split: str = "validation", batch_size: int | None = None):
  """Deterministic evaluation batches with a `mask` for the padding of the last batch."""
  d = config.data
  if d.synthetic:
    n = batch_size or config.batch_size
    it = SyntheticIterator(n, d.image_size, d.num_classes, seed=1)
    return (dict(next(it), mask=np.ones(n, bool)) for _ in range(2))
  from vqkd_jax.data.pipeline import load_dataset, make_eval_iterator
  splits, _ = load_dataset(d.name, d.data_dir, d.image_size)
  return make_eval_iterator(splits[split], global_batch_size=batch_size or config.batch_size,
                            image_size=d.image_size)


class SyntheticIterator:
  """Random uint8 images, labels and square segmentations (0 = background, label + 1 inside),
  seeded per batch index; needs neither tfds nor grain
  (benchmarks, and machines without the data packages). Checkpointable like the real iterators."""

  def __init__(self, batch_size: int, image_size: int, num_classes: int, seed: int):
    self.batch_size, self.image_size, self.num_classes, self.seed = (
        batch_size, image_size, num_classes, seed)
    self.index = 0

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    rng = np.random.default_rng([self.seed, self.index])
    self.index += 1
    s, b = self.image_size, self.batch_size
    labels = rng.integers(0, self.num_classes, (b,), dtype=np.int32)
    yy, xx = np.mgrid[:s, :s]
    corner = rng.integers(0, s // 2, (b, 2))
    inside = ((yy >= corner[:, :1, None]) & (yy < corner[:, :1, None] + s // 2) &
              (xx >= corner[:, 1:, None]) & (xx < corner[:, 1:, None] + s // 2))
    return {"image": rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8), "label": labels,
            "segmentation": np.where(inside, labels[:, None, None] + 1, 0).astype(np.uint8)}

  def get_state(self) -> dict:
    return {"index": self.index}

  def set_state(self, state: dict) -> None:
    self.index = int(state["index"])


def example_batch(config, batch_size: int = 2) -> dict:
  """A zero batch with the shapes and dtypes of real ones (for model init)."""
  s = config.data.image_size
  return {"image": np.zeros((batch_size, s, s, 3), np.uint8),
          "label": np.zeros((batch_size,), np.int32),
          "segmentation": np.zeros((batch_size, s, s), np.uint8)}


def to_global_batch(batch: dict, sharding) -> dict:
  """Per-process numpy batches -> global jax.Arrays split along the batch axis."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items() if not isinstance(v, (list, tuple)) and np.asarray(v).dtype != object}
