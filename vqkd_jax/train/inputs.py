"""The loop's view of the data: config.data -> a checkpointable iterator of per-process batches."""

from __future__ import annotations

import jax
import numpy as np


def make_train_input(config):
  """A per-process iterator of training batches (dicts of numpy arrays) with get_state/set_state.

  config.data.synthetic=True gives random batches without tfds or grain (benchmarks)."""
  d = config.data
  if d.synthetic:
    from vqkd_jax.data.pipeline import synthetic_iterator
    return synthetic_iterator(config.batch_size, d.image_size, d.num_classes, config.seed)
  from vqkd_jax.data.pipeline import load_dataset, make_train_iterator
  splits, _ = load_dataset(d.name, d.data_dir, d.image_size)
  return make_train_iterator(
      splits["train"], global_batch_size=config.batch_size, image_size=d.image_size,
      augmentation=d.augmentation, seed=config.seed)


def make_eval_input(config, split: str = "validation", batch_size: int | None = None):
  """Deterministic evaluation batches with a `mask` for the padding of the last batch."""
  d = config.data
  if d.synthetic:
    from vqkd_jax.data.pipeline import synthetic_iterator
    it = synthetic_iterator(batch_size or config.batch_size, d.image_size, d.num_classes, 1)
    return (dict(next(it), mask=np.ones(batch_size or config.batch_size, bool)) for _ in range(2))
  from vqkd_jax.data.pipeline import load_dataset, make_eval_iterator
  splits, _ = load_dataset(d.name, d.data_dir, d.image_size)
  return make_eval_iterator(splits[split], global_batch_size=batch_size or config.batch_size,
                            image_size=d.image_size)


def example_batch(config, batch_size: int = 2) -> dict:
  """A zero batch with the shapes and dtypes of real ones (for model init)."""
  s = config.data.image_size
  return {"image": np.zeros((batch_size, s, s, 3), np.uint8),
          "label": np.zeros((batch_size,), np.int32)}


def to_global_batch(batch: dict, sharding) -> dict:
  """Per-process numpy batches -> global jax.Arrays split along the batch axis."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items() if not isinstance(v, (list, tuple)) and np.asarray(v).dtype != object}
