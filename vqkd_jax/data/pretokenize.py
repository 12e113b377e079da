"""Pre-tokenised datasets: a frozen tokenizer's codes of every training image, in ArrayRecord files,
so that proposal-network training does not run the tokenizer at each step (as LlamaGen does).

Each image is stored under several views: `crops` crops (1: the centre crop of the image resized
to image_size; 5: the four corners and the centre of the image resized to 1.1 x image_size, as
LlamaGen's ten-crop) and, with `flip`, their horizontal mirrors. Training draws one view per image
and epoch. Records are msgpack maps {"tokens": int array [views, h * w], "label": int} (no pickle);
`metadata.json` beside them holds num_codes, grid, views, count and the tokenizer's work directory.

  vqkd data pretokenize --tokenizer runs/demo/tokenizer --out runs/demo/tokens \
      [--data shapes --data_dir ... --image_size 32 --crops 5 --flip]
"""

from __future__ import annotations

import json
import os

import numpy as np

from vqkd_jax.data import augment

METADATA = "metadata.json"


def views(image: np.ndarray, size: int, crops: int, flip: bool) -> np.ndarray:
  """uint8 [H, W, 3] -> uint8 [V, size, size, 3]: centre crop (crops=1) or corners + centre of the
  image resized (short side) to round(1.1 size) (crops=5), then the mirrors of those if `flip`."""
  if crops == 1:
    out = [augment.resize_center_crop(image, size)]
  elif crops == 5:
    big = augment.resize_center_crop(image, int(round(1.1 * size)))
    b = big.shape[0]
    corners = [(0, 0), (0, b - size), (b - size, 0), (b - size, b - size)]
    out = [big[i:i + size, j:j + size] for i, j in corners] + [augment.center_crop(big, size)]
  else:
    raise ValueError(f"crops must be 1 or 5, got {crops}")
  if flip:
    out += [v[:, ::-1] for v in out]
  return np.stack(out)


def pretokenize(tokenizer, source, out_dir: str, *, image_size: int, crops: int = 1,
                flip: bool = True, batch_size: int = 256, records_per_shard: int = 100_000,
                tokenizer_workdir: str = "") -> dict:
  """Writes the codes of every example of `source` (random access, dicts with "image", "label") in
  source order; returns the metadata. `tokenizer` is a tokenizers.frozen.FrozenTokenizer."""
  import jax
  from array_record.python import array_record_module
  from flax import serialization

  os.makedirs(out_dir, exist_ok=True)
  encode = jax.jit(tokenizer.encode)
  h, w = tokenizer.grid(image_size)
  dtype = np.int16 if tokenizer.num_codes <= np.iinfo(np.int16).max else np.int32
  n = len(source)
  num_views = crops * (2 if flip else 1)
  shards, writer = [], None
  for start in range(0, n, batch_size):
    stop = min(start + batch_size, n)
    records = [source[i] for i in range(start, stop)]
    imgs = np.concatenate([views(np.asarray(r["image"]), image_size, crops, flip) for r in records])
    pad = batch_size * num_views - len(imgs)  # One compiled shape: pad the last batch.
    codes = np.asarray(encode(tokenizer.variables, np.pad(imgs, ((0, pad),) + ((0, 0),) * 3)))
    codes = codes[:len(imgs)].reshape(len(records), num_views, h * w).astype(dtype)
    for i, r in enumerate(records):
      if (start + i) % records_per_shard == 0:
        if writer is not None:
          writer.close()
        shards.append(f"tokens-{len(shards):05d}.array_record")
        writer = array_record_module.ArrayRecordWriter(os.path.join(out_dir, shards[-1]),
                                                       "group_size:1")
      writer.write(serialization.msgpack_serialize(
          {"tokens": codes[i], "label": int(r["label"])}))
  if writer is not None:
    writer.close()
  meta = {"num_codes": int(tokenizer.num_codes), "grid": [int(h), int(w)], "views": num_views,
          "crops": crops, "flip": flip, "count": n, "image_size": image_size,
          "shards": shards, "tokenizer_workdir": tokenizer_workdir}
  with open(os.path.join(out_dir, METADATA), "w") as f:
    json.dump(meta, f, indent=2)
  return meta


def read_metadata(tokens_dir: str) -> dict:
  path = os.path.join(tokens_dir, METADATA)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{tokens_dir} holds no pre-tokenised dataset ({METADATA} missing); "
                            f"write one with `vqkd data pretokenize`")
  with open(path) as f:
    return json.load(f)


class TokenSource:
  """Random access to a pre-tokenised directory: source[i] -> {"tokens": [views, h * w],
  "label": int}."""

  def __init__(self, tokens_dir: str):
    import grain

    self.metadata = read_metadata(tokens_dir)
    paths = [os.path.join(tokens_dir, s) for s in self.metadata["shards"]]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
      raise FileNotFoundError(f"pre-tokenised shards missing: {missing}")
    self._source = grain.sources.ArrayRecordDataSource(paths)
    if len(self._source) != self.metadata["count"]:
      raise ValueError(f"{tokens_dir}: {len(self._source)} records, metadata says "
                       f"{self.metadata['count']} (an interrupted write?)")

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict:
    from flax import serialization
    return serialization.msgpack_restore(self._source[index])


class _PickView:
  """record, rng -> {"tokens": int32 [h * w] (one view drawn per image and epoch), "label"}."""

  def __call__(self, record: dict, rng: np.random.Generator) -> dict:
    tokens = np.asarray(record["tokens"])
    return {"tokens": tokens[rng.integers(len(tokens))].astype(np.int32),
            "label": np.int32(record["label"])}


def make_token_iterator(tokens_dir: str, *, global_batch_size: int, seed: int = 0,
                        process_index: int | None = None, process_count: int | None = None):
  """Endless, checkpointable iterator of {"tokens": int32 [b, h * w], "label": int32 [b]}: the
  same shuffling, per-process slicing and resumable state as the image pipeline."""
  import grain

  from vqkd_jax.data.pipeline import TrainIterator, _local_batch_size, _process

  pi, pc = _process(process_index, process_count)
  local = _local_batch_size(global_batch_size, pc)
  seeds = np.random.SeedSequence([int(seed), pi]).generate_state(2)
  ds = grain.MapDataset.source(TokenSource(tokens_dir))[pi::pc]
  ds = ds.shuffle(seed=int(seeds[0])).repeat().random_map(_PickView(), seed=int(seeds[1]))
  return TrainIterator(ds.batch(local, drop_remainder=True))
