"""The loop's view of the data: config.data -> a checkpointable iterator of per-process batches."""

from __future__ import annotations

import jax
import numpy as np

from vqkd_jax.data.pipeline import synthetic_iterator, to_global_batch  # noqa: F401 (re-export)


def make_train_input(config):
  """A per-process iterator of training batches (dicts of numpy arrays) with get_state/set_state.

  config.data.synthetic=True gives random batches without tfds or grain (benchmarks);
  config.data.tokens_dir reads pre-tokenised codes ({"tokens", "label"}) instead of images."""
  d = config.data
  if d.synthetic:
    return synthetic_iterator(config.batch_size, d.image_size, d.num_classes, config.seed)
  if d.get("tokens_dir"):  # Pre-tokenised codes (proposal networks): data/pretokenize.py.
    from vqkd_jax.data.pretokenize import make_token_iterator
    return make_token_iterator(d.tokens_dir, global_batch_size=config.batch_size, seed=config.seed)
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
    it = synthetic_iterator(n, d.image_size, d.num_classes, seed=config.seed + 1)
    return (dict(next(it), mask=np.ones(n // jax.process_count(), bool)) for _ in range(2))
  from vqkd_jax.data.pipeline import load_dataset, make_eval_iterator
  splits, _ = load_dataset(d.name, d.data_dir, d.image_size)
  return make_eval_iterator(splits[split], global_batch_size=batch_size or config.batch_size,
                            image_size=d.image_size)


def example_batch(config, batch_size: int = 2) -> dict:
  """A zero batch with the shapes and dtypes of real ones (for model init)."""
  s = config.data.image_size
  return {"image": np.zeros((batch_size, s, s, 3), np.uint8),
          "label": np.zeros((batch_size,), np.int32),
          "segmentation": np.zeros((batch_size, s, s), np.uint8)}
