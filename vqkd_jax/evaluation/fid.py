"""FID and Inception Score with the JAX FID Inception: batched, sharded extraction and statistics.

  extractor = InceptionExtractor(load_inception_params("inception.npz"), batch_size=256)
  ref = write_reference_stats(val_batches, "imagenet_val_256.npz", extractor)   # once
  result = evaluate_fid_is(extractor, generated_batches, "imagenet_val_256.npz")
  # {"fid": ..., "inception_score": ..., "inception_score_std": ..., "count": N}

`InceptionExtractor` runs the network jitted over a 1-D mesh of this process's devices, the batch
split over them; a short last batch is padded with zero images to the fixed batch size (one
compiled program) and its padding, like rows whose mask is False, is dropped from the outputs,
so that every real image counts exactly once. Statistics accumulate in float64 on the host
(`FeatureStatistics`). With several processes, each extracts its own share of the images;
merge their FeatureStatistics (FeatureStatistics.merge) and concatenate their logits.

Reference statistics follow upstream's protocol (§6): ImageNet val (50k) with torchvision
Resize(256, bicubic) + CenterCrop(256) (`reference_image` / the data pipeline's eval iterator at
image_size 256), pool features of the FID Inception, mean and covariance in float64.
"""

from __future__ import annotations

import os
import time
from typing import Iterable, Iterator, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vqkd_jax.evaluation import inception as inception_lib
from vqkd_jax.evaluation.frechet import FeatureStatistics, frechet_distance
from vqkd_jax.evaluation.metrics import inception_score
from vqkd_jax.parallel import xla_options

REFERENCE_IMAGE_SIZE = 256


class InceptionExtractor:
  """Jitted FID-Inception forward over this process's devices (batch sharded, params replicated).

  Args:
    params: converted FIDInceptionV3 params (inception.load_inception_params / convert_inception).
    batch_size: images per device call; rounded up to a multiple of the device count.
    preprocess: "torch" (pytorch-fid / upstream FID) or "tf1" (TF FID, OpenAI, torch-fidelity).
    precision_mode: "exact" (float32, HIGHEST), "fast" (float16), "tf32" or "bf16"
      (inception.PRECISION_MODES).
    outputs: which network outputs to return ("pool", "logits", "logits_unbiased").
    devices: defaults to jax.local_devices().

  Calling it on uint8 images [n, H, W, 3] (and an optional mask [n]) returns {name: float32 numpy
  [m, ...]} for the m <= n rows kept (mask True), in order.
  """

  def __init__(self, params, *, batch_size: int = 256, preprocess: str = "torch",
               precision_mode: str = "exact", outputs=("pool", "logits_unbiased"), devices=None):
    devices = list(jax.local_devices() if devices is None else devices)
    self.mesh = Mesh(np.asarray(devices), ("batch",),
                     axis_types=(jax.sharding.AxisType.Auto,))
    n_dev = len(devices)
    self.batch_size = -(-int(batch_size) // n_dev) * n_dev
    self.outputs = tuple(outputs)
    self.model = inception_lib.build_inception(preprocess, precision_mode)
    replicated = NamedSharding(self.mesh, P())
    self.batch_sharding = NamedSharding(self.mesh, P("batch"))
    self.params = jax.device_put(params, replicated)
    model, outputs = self.model, self.outputs

    def forward(params, images):
      out = model.apply({"params": params}, images)
      return {k: out[k] for k in outputs}

    # Exact float32 convolutions in NCHW (H200, batch 256: 2,289 -> 2,796 images/s).
    options = xla_options.NCHW_CONVS if precision_mode == "exact" else {}
    self._forward = xla_options.jit_with_options(
        forward, options, in_shardings=(replicated, self.batch_sharding),
        out_shardings=self.batch_sharding)

  def _dispatch(self, images: np.ndarray):
    """Pads uint8 [k <= batch_size, H, W, 3] to the batch size, starts the device computation."""
    k = images.shape[0]
    if k < self.batch_size:
      pad = np.zeros((self.batch_size - k,) + images.shape[1:], images.dtype)
      images = np.concatenate([images, pad])
    return self._forward(self.params, jax.device_put(images, self.batch_sharding)), k

  def stream(self, batches: Iterable) -> Iterator[dict]:
    """Outputs batch by batch for an iterable of uint8 [n, H, W, 3] arrays or dicts {"image",
    optional "mask"}; one device call is in flight while the previous one is fetched."""
    pending: list = []
    for batch in batches:
      images, mask = _images_and_mask(batch)
      for i in range(0, images.shape[0], self.batch_size):
        chunk = images[i:i + self.batch_size]
        keep = None if mask is None else mask[i:i + self.batch_size]
        pending.append((self._dispatch(chunk), keep))
        if len(pending) > 1:
          yield _fetch(*pending.pop(0))
    while pending:
      yield _fetch(*pending.pop(0))

  def __call__(self, images, mask=None) -> dict:
    parts = list(self.stream([{"image": images, "mask": mask}]))
    if not parts:
      raise ValueError("no images")
    return {k: np.concatenate([p[k] for p in parts]) for k in self.outputs}


def _images_and_mask(batch) -> tuple[np.ndarray, np.ndarray | None]:
  if isinstance(batch, Mapping):
    images, mask = batch["image"], batch.get("mask")
  else:
    images, mask = batch, None
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"expected uint8 images [n, H, W, 3], got {images.dtype} {images.shape}")
  if mask is not None:
    mask = np.asarray(mask).astype(bool).reshape(-1)
    if mask.shape[0] != images.shape[0]:
      raise ValueError(f"mask has {mask.shape[0]} entries for {images.shape[0]} images")
  return images, mask


def _fetch(dispatched, keep) -> dict:
  out, k = dispatched
  out = {name: np.asarray(jax.device_get(v))[:k] for name, v in out.items()}
  if keep is not None:
    out = {name: v[keep] for name, v in out.items()}
  return out


def inception_outputs(extractor: InceptionExtractor, batches: Iterable,
                      keep_logits: bool = True) -> tuple[FeatureStatistics, np.ndarray | None]:
  """Pool-feature statistics (float64) and, with keep_logits, the unbiased logits [N, 1008]
  (float32) of every kept image of `batches` (see InceptionExtractor.stream)."""
  stats = FeatureStatistics()
  logits = []
  for out in extractor.stream(batches):
    stats.update(out["pool"])
    if keep_logits and "logits_unbiased" in out:
      logits.append(out["logits_unbiased"])
  return stats, (np.concatenate(logits) if logits else None)


# ----------------------------------------------------------------------- reference statistics


def reference_image(image: np.ndarray, size: int = REFERENCE_IMAGE_SIZE) -> np.ndarray:
  """Upstream's reference protocol for one image: uint8 [H, W] / [H, W, 1|3|4] -> RGB, Resize(size)
  (short side, PIL bicubic) + CenterCrop(size) -> uint8 [size, size, 3]. The data pipeline's eval
  iterator (make_eval_iterator with image_size=size) does the same per example."""
  from vqkd_jax.data.augment import ensure_rgb, resize_center_crop
  return resize_center_crop(ensure_rgb(np.asarray(image, np.uint8)), size)


def _prepared_batches(images: Iterable, size: int, batch_size: int) -> Iterator:
  """Batches of 4-D arrays / dicts pass through; single images [H, W(, C)] are transformed with
  reference_image and grouped into batches of batch_size."""
  group: list = []
  for item in images:
    if isinstance(item, Mapping) or np.ndim(item) == 4:
      if group:
        yield np.stack(group)
        group = []
      yield item
    else:
      group.append(reference_image(item, size))
      if len(group) == batch_size:
        yield np.stack(group)
        group = []
  if group:
    yield np.stack(group)


def write_reference_stats(images: Iterable, out_path: str, extractor: InceptionExtractor,
                          size: int = REFERENCE_IMAGE_SIZE) -> FeatureStatistics:
  """Computes and saves (.npz, no pickle) the pool-feature statistics of a reference set.

  images: an iterable of single uint8 images of any size (each goes through reference_image:
  resize + centre crop to `size`), or of ready batches (uint8 [n, size, size, 3], or dicts
  {"image", "mask"} from the data pipeline's eval iterator at image_size=size). Returns the
  FeatureStatistics (mean(), covariance() in float64) that were saved to out_path."""
  stats, _ = inception_outputs(extractor, _prepared_batches(images, size, extractor.batch_size),
                               keep_logits=False)
  stats.save(out_path)
  return stats


def load_reference_stats(path: str) -> tuple[np.ndarray, np.ndarray]:
  """(mu [d], sigma [d, d]) float64 from our FeatureStatistics .npz, or from an .npz with "mu" and
  "sigma" (pytorch-fid's --save-stats, OpenAI's reference batches)."""
  path = os.fspath(path)
  with np.load(path, allow_pickle=False) as f:
    if "mu" in f.files and "sigma" in f.files:
      return f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
  stats = FeatureStatistics.load(path)
  return stats.mean(), stats.covariance()


def evaluate_fid_is(extractor: InceptionExtractor, batches: Iterable, reference,
                    splits: int = 10) -> dict:
  """FID against `reference` (a path for load_reference_stats, a FeatureStatistics, or (mu,
  sigma)) and the Inception Score (`splits` splits) of the images of `batches`.

  Returns {"fid", "inception_score", "inception_score_std", "count", "seconds"}; the IS entries
  are None when the extractor gives no "logits_unbiased" or there are fewer images than splits."""
  t0 = time.time()
  stats, logits = inception_outputs(extractor, batches)
  if isinstance(reference, FeatureStatistics):
    mu_ref, sigma_ref = reference.mean(), reference.covariance()
  elif isinstance(reference, (tuple, list)):
    mu_ref, sigma_ref = reference
  else:
    mu_ref, sigma_ref = load_reference_stats(reference)
  result = {"fid": frechet_distance(stats.mean(), stats.covariance(), mu_ref, sigma_ref),
            "inception_score": None, "inception_score_std": None, "count": stats.count}
  if logits is not None and logits.shape[0] >= splits:
    result["inception_score"], result["inception_score_std"] = inception_score(logits, splits)
  result["seconds"] = time.time() - t0
  return result
