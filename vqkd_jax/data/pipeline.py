"""Input pipelines: grain over random-access sources (tfds ArrayRecord datasets); synthetic data.

Training (`make_train_iterator`): this process's slice of the examples, a seeded shuffle that
changes every epoch, endless repetition, per-example augmentation seeded by (seed, process, position
in the stream), batches of global_batch_size / process_count. The iterator's state is its position
(`get_state()` is a small JSON-serialisable dict), so a restored iterator continues the stream
exactly.

Evaluation (`make_eval_iterator`): resize + centre crop, dataset order, every example exactly once
across processes (process p takes examples p, p + P, ...); the last batches are padded and marked
by a bool `mask`; every process yields the same number of batches.

Batches are dicts of numpy arrays: image uint8 [b,S,S,3], label int32 [b] (and mask bool [b]);
sources with a "segmentation" label map (the built-in dataset: 0 = background, label + 1 on the
object) add segmentation uint8 [b,S,S], cropped/flipped like the image.
grain and tensorflow-datasets are imported inside functions only: `synthetic_iterator` and
`to_global_batch` work on machines without them.
"""

from __future__ import annotations

import math
import os
from typing import Any, Iterator, NamedTuple

import numpy as np

from vqkd_jax.data import augment as augment_lib


class DatasetSources(NamedTuple):
  """What `load_dataset` returns: {split: random-access source} and the number of classes."""
  splits: dict
  num_classes: int


# ----------------------------------------------------------------------------------------------
# Datasets by name.


def load_dataset(name: str, data_dir: str, image_size: int = 32) -> DatasetSources:
  """Random-access sources of a dataset by name; unpacks as ``(splits, num_classes)``.

  Args:
    name: "shapes" (built-in, prepared on first use under data_dir; image_size picks the 32 or 64
      config), "shapes_small" (its 2,000 / 500 variant), "imagenet2012" (tfds, prepared from a
      manual directory, see data/imagenet.py), "image_folder:<path>" (a folder dataset converted by
      `convert_image_folder`: its directory, or its name under data_dir) or "folder:<name>".
    data_dir: the tfds data directory.
    image_size: for "shapes" only (the pipelines resize everything else).

  Returns:
    DatasetSources(splits={"train": source, "validation": source}, num_classes); ``source[i]``
    is a dict with at least "image" (uint8 [H,W,3]) and "label".
  """
  data_dir = os.path.expanduser(data_dir)
  if name in ("shapes", "shapes_small"):
    from vqkd_jax.data import shapes
    from vqkd_jax.data.shapes_builder import load_shapes
    return DatasetSources(load_shapes(data_dir, image_size, small=name == "shapes_small"),
                          shapes.NUM_CLASSES)
  if name == "imagenet2012":
    from vqkd_jax.data.imagenet import load_imagenet
    return DatasetSources(*load_imagenet(data_dir))
  for prefix in ("image_folder:", "folder:"):
    if name.startswith(prefix):
      from vqkd_jax.data.image_folder import load_converted
      return DatasetSources(*load_converted(name[len(prefix):], data_dir))
  raise ValueError(f"unknown dataset {name!r}: shapes, shapes_small, imagenet2012, "
                   "image_folder:<path or name>")


# ----------------------------------------------------------------------------------------------
# Per-example transforms (top-level classes: picklable for grain worker processes).


class _TrainTransform:
  """record, rng -> {"image": uint8 [S,S,3], "label": int32} (+ "segmentation" uint8 [S,S] when
  the source has it, + "caption" str if asked)."""

  def __init__(self, image_size: int, augmentation: str, include_caption: bool):
    augment_lib.make_augmentation(augmentation, image_size)  # Validates the name.
    self.image_size, self.augmentation = image_size, augmentation
    self.include_caption = include_caption

  def __call__(self, record: dict, rng: np.random.Generator) -> dict:
    image, seg = augment_lib.augment_with_segmentation(
        np.asarray(record["image"]), record.get("segmentation"), rng, self.image_size,
        self.augmentation)
    out = {"image": image, "label": np.int32(record["label"])}
    if seg is not None:
      out["segmentation"] = seg
    if self.include_caption:
      out["caption"] = _text(record.get("caption", ""))
    return out


class _EvalExample:
  """Position in this process's padded stream -> example (resize + centre crop) with its mask."""

  def __init__(self, source, indices: np.ndarray, image_size: int, include_caption: bool):
    self.source, self.indices, self.image_size = source, indices, image_size
    self.include_caption = include_caption
    self.has_segmentation = len(source) > 0 and "segmentation" in source[0]

  def __call__(self, position: int) -> dict:
    s = self.image_size
    if position < len(self.indices):
      record = self.source[int(self.indices[position])]
      image, seg = augment_lib.augment_with_segmentation(
          np.asarray(record["image"]), record.get("segmentation"), None, s, "none")
      out = {"image": image, "label": np.int32(record["label"]), "mask": np.bool_(True)}
      caption = record.get("caption", "")
    else:
      out = {"image": np.zeros((s, s, 3), np.uint8), "label": np.int32(0),
             "mask": np.bool_(False)}
      seg, caption = np.zeros((s, s), np.uint8), ""
    if self.has_segmentation:
      out["segmentation"] = seg
    if self.include_caption:
      out["caption"] = _text(caption)
    return out


def _text(value: Any) -> str:
  value = np.asarray(value).item() if isinstance(value, np.ndarray) else value
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  return process_index, process_count


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
  if global_batch_size % process_count:
    raise ValueError(f"global batch size {global_batch_size} does not split evenly over "
                     f"{process_count} processes")
  return global_batch_size // process_count


def _ensure_absl_flags_parsed() -> None:
  """grain worker processes read absl flags; unparsed flags crash them (UnparsedFlagAccessError)."""
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


# ----------------------------------------------------------------------------------------------
# Training.


def make_train_iterator(source, *, global_batch_size: int, image_size: int,
                        augmentation: str = "default", seed: int = 0,
                        process_index: int | None = None, process_count: int | None = None,
                        worker_count: int = 0, num_threads: int = 4,
                        include_caption: bool = False):
  """Endless, checkpointable iterator of this process's training batches.

  Args:
    source: random-access source (``len``, ``__getitem__``) of dicts with "image", "label".
    global_batch_size: batch over all processes; each yields global_batch_size / process_count.
    image_size: output side S.
    augmentation: a name in augment.AUGMENTATIONS ("default", "strong", "weak", "none", "flip").
    seed: shuffle and augmentation seed (the same seed gives the same stream).
    process_index, process_count: this process and their number (default: from jax).
    worker_count: grain worker processes (0 = threads in this process).
    num_threads: reader threads (per worker).
    include_caption: add "caption" (numpy str array [b]) from the source.

  Returns:
    A TrainIterator yielding {"image": uint8 [b,S,S,3], "label": int32 [b]} (plus "segmentation"
    uint8 [b,S,S], augmented alike, when the source has it: the built-in dataset), with
    ``get_state() -> {"batches": k}`` (JSON-serialisable), ``set_state(dict)`` and ``close()``.
  """
  import grain
  pi, pc = _process(process_index, process_count)
  local = _local_batch_size(global_batch_size, pc)
  if len(source) < pc:
    raise ValueError(f"dataset of {len(source)} examples cannot be split over {pc} processes")
  seeds = np.random.SeedSequence([int(seed), pi]).generate_state(2)
  ds = grain.MapDataset.source(source)[pi::pc]
  ds = ds.shuffle(seed=int(seeds[0])).repeat()  # The shuffle is reseeded for each epoch.
  ds = ds.random_map(_TrainTransform(image_size, augmentation, include_caption),
                     seed=int(seeds[1]))  # rng per position in the endless stream.
  ds = ds.batch(local, drop_remainder=True)
  return TrainIterator(ds, worker_count=worker_count, num_threads=num_threads)


class TrainIterator:
  """Iterator over a random-access dataset of batches whose state is the number of batches taken.

  ``get_state()`` is {"batches": k}; ``set_state`` rebuilds the grain iterator from ``ds[k:]``, so
  the continued stream is exactly the uninterrupted one, whatever worker_count was used before.
  (grain's own iterator states differ between threads and worker processes.)
  """

  def __init__(self, batches, *, worker_count: int = 0, num_threads: int = 4):
    self._batches, self._worker_count, self._num_threads = batches, worker_count, num_threads
    self._taken = 0
    self._it = None

  def _build(self):
    import grain
    ds = self._batches[self._taken:] if self._taken else self._batches
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=self._num_threads,
                                                 prefetch_buffer_size=max(2 * self._num_threads,
                                                                          2)))
    if self._worker_count > 0:
      _ensure_absl_flags_parsed()
      it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._worker_count))
    return iter(it_ds)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if self._it is None:
      self._it = self._build()
    batch = next(self._it)
    self._taken += 1
    return batch

  def get_state(self) -> dict:
    """{"batches": number of batches taken so far} (JSON-serialisable)."""
    return {"batches": self._taken}

  def set_state(self, state: dict) -> None:
    """Continues after ``state["batches"]`` batches of the same stream."""
    self.close()
    self._taken = int(state["batches"])

  def close(self) -> None:
    """Stops reader threads / worker processes (a later next() restarts them)."""
    if self._it is not None:
      close = getattr(self._it, "close", None)
      if close is not None:
        close()
      self._it = None


# ----------------------------------------------------------------------------------------------
# Evaluation.


def make_eval_iterator(source, *, global_batch_size: int, image_size: int,
                       process_index: int | None = None, process_count: int | None = None,
                       num_threads: int = 4, include_caption: bool = False) -> Iterator[dict]:
  """Deterministic evaluation batches of this process, every example once across processes.

  Process p takes examples p, p + P, p + 2P, ... in order, pads them to
  ``num_batches * b`` (b = global_batch_size / P, num_batches = ceil(ceil(N / P) / b), the same on
  every process) with zero images and label 0.

  Returns:
    An iterator of {"image": uint8 [b,S,S,3] (resize short side + centre crop, PIL bicubic),
    "label": int32 [b], "mask": bool [b] (False on padding)} (plus "segmentation" uint8 [b,S,S]
    when the source has it).
  """
  import grain
  pi, pc = _process(process_index, process_count)
  local = _local_batch_size(global_batch_size, pc)
  n = len(source)
  num_batches = math.ceil(math.ceil(n / pc) / local)
  indices = np.arange(pi, n, pc)
  ds = grain.MapDataset.range(num_batches * local).map(
      _EvalExample(source, indices, image_size, include_caption))
  ds = ds.batch(local, drop_remainder=False)
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                   prefetch_buffer_size=max(2 * num_threads, 2))))


def num_eval_batches(num_examples: int, global_batch_size: int, process_count: int = 1) -> int:
  """How many batches make_eval_iterator yields on every process."""
  local = _local_batch_size(global_batch_size, process_count)
  return math.ceil(math.ceil(num_examples / process_count) / local)


# ----------------------------------------------------------------------------------------------
# Synthetic data (no tfds, no grain).


class SyntheticIterator:
  """Random uint8 batches for benchmarks: a pool of ``pool_size`` random batches generated once,
  cycled (so that producing a batch costs nothing), labels redrawn per step; with
  ``segmentation``, a random square per image labelled label + 1 (0 = background). Checkpointable
  (state: {"index": batches taken})."""

  def __init__(self, batch_size: int, image_size: int, num_classes: int, seed: int = 0,
               pool_size: int = 4, segmentation: bool = True):
    self.batch_size, self.image_size, self.num_classes = batch_size, image_size, num_classes
    self.seed, self.index = seed, 0
    rng = np.random.default_rng([seed, 0])
    s = image_size
    self._pool = [rng.integers(0, 256, (batch_size, s, s, 3), dtype=np.uint8)
                  for _ in range(pool_size)]
    self._inside = None
    if segmentation:
      yy, xx = np.mgrid[:s, :s]
      self._inside = []
      for _ in range(pool_size):
        corner = rng.integers(0, s - s // 2 + 1, (batch_size, 2))
        self._inside.append((yy >= corner[:, :1, None]) & (yy < corner[:, :1, None] + s // 2) &
                            (xx >= corner[:, 1:, None]) & (xx < corner[:, 1:, None] + s // 2))

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    rng = np.random.default_rng([self.seed, 1, self.index])
    k = self.index % len(self._pool)
    self.index += 1
    labels = rng.integers(0, self.num_classes, (self.batch_size,), dtype=np.int32)
    out = {"image": self._pool[k], "label": labels}
    if self._inside is not None:
      out["segmentation"] = np.where(self._inside[k], labels[:, None, None] + 1,
                                     0).astype(np.uint8)
    return out

  def get_state(self) -> dict:
    return {"index": self.index}

  def set_state(self, state: dict) -> None:
    self.index = int(state["index"])


def synthetic_iterator(global_batch_size: int, image_size: int, num_classes: int, seed: int = 0,
                       process_index: int | None = None, process_count: int | None = None,
                       segmentation: bool = True) -> SyntheticIterator:
  """Endless random batches {"image": uint8 [b,S,S,3], "label": int32 [b], "segmentation":
  uint8 [b,S,S] (if asked)}, b = global / P.

  Needs neither tfds nor grain; different processes get different data.
  """
  pi, pc = _process(process_index, process_count)
  return SyntheticIterator(_local_batch_size(global_batch_size, pc), image_size, num_classes,
                           seed=int(np.random.SeedSequence([int(seed), pi]).generate_state(1)[0]),
                           segmentation=segmentation)


# ----------------------------------------------------------------------------------------------
# Global arrays.


def to_global_batch(local_batch: dict, sharding_for_leading_axis) -> dict:
  """Per-process numpy batch -> global jax.Arrays, split over processes along the leading axis.

  Args:
    local_batch: {name: numpy array [b, ...]} (non-numeric fields such as captions are dropped).
    sharding_for_leading_axis: a jax.sharding.Sharding (e.g. NamedSharding(mesh, P(("data",
      "fsdp")))) used for every field; only the leading axis is partitioned.

  Returns:
    {name: jax.Array [b * process_count, ...]}.
  """
  import jax
  out = {}
  for k, v in local_batch.items():
    v = np.asarray(v)
    if v.dtype.kind in "OUS":
      continue
    out[k] = jax.make_array_from_process_local_data(sharding_for_leading_axis, v)
  return out
