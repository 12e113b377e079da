"""Do a teacher's patch tokens say what is where? The evaluation that the in-the-box teachers share.

Two numbers on the frozen tokens of the validation split:
  token_similarity: mean cosine similarity between the tokens of an image (diagonal included, as
    train/teacher.py reports it); near 1 = collapsed tokens, a useless distillation target.
  probe_*: a linear probe of the per-patch labels of train/teacher.patch_targets (the object's class
    where it covers at least half of the patch, else background): softmax regression on the
    standardised tokens (100 full-batch Adam steps, under a second for the 2,000 validation images),
    fitted on the first `fit_fraction` of the images and scored on the others. probe_accuracy
    counts every patch; probe_object_accuracy the object's patches only (the majority rule,
    "background everywhere", gets 0 there); probe_majority is that rule's accuracy, the floor to
    compare probe_accuracy with.
Reference points on the 32x32 dataset: the supervised teacher (configs/demo/teacher.py, trained on
these very labels) 0.87 / 0.975 / 0.73 (similarity / probe / object probe); a randomly initialised
4-block ViT with a convolutional stem about 0.26 / 0.944 / 0.31: colour and place are linearly
readable from a random network, shape is what training adds.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


def token_similarity(tokens: jax.Array) -> jax.Array:
  """[B, N, D] -> [B]: mean over (n, m) of cos(token n, token m) within each image."""
  t = tokens.astype(jnp.float32)
  t = t / jnp.maximum(jnp.linalg.norm(t, axis=-1, keepdims=True), 1e-12)
  return jnp.einsum("bnd,bmd->bnm", t, t).mean(axis=(1, 2))


def fit_logistic_probe(features: np.ndarray, labels: np.ndarray, num_classes: int,
                       steps: int = 100, lr: float = 0.1, l2: float = 1e-4):
  """Softmax regression of labels on standardised features: `steps` full-batch Adam steps from
  zero weights, minimising mean cross-entropy + l2 * |W|^2 (bias not penalised).

  features [M, D], labels int [M] in [0, num_classes). Returns (mean [D], std [D], weights
  [D + 1, num_classes], the last row the bias) for `predict_probe`."""
  import optax

  x = np.asarray(features, np.float32)
  mean, std = x.mean(axis=0), x.std(axis=0) + 1e-6
  x = np.concatenate([(x - mean) / std, np.ones((len(x), 1), np.float32)], axis=1)

  @jax.jit
  def fit(x, y):
    tx = optax.adam(lr)
    w = jnp.zeros((x.shape[1], num_classes), jnp.float32)

    def objective(w):
      ce = optax.softmax_cross_entropy_with_integer_labels(x @ w, y).mean()
      return ce + l2 * jnp.sum(jnp.square(w[:-1]))

    def step(_, carry):
      w, opt = carry
      updates, opt = tx.update(jax.grad(objective)(w), opt)
      return optax.apply_updates(w, updates), opt

    return jax.lax.fori_loop(0, steps, step, (w, tx.init(w)))[0]

  return mean, std, np.asarray(fit(x, np.asarray(labels, np.int32)))


def predict_probe(probe, features: np.ndarray) -> np.ndarray:
  """Class predictions int [M] of a fit_logistic_probe result for features [M, D]."""
  mean, std, weights = probe
  x = (np.asarray(features, np.float32) - mean) / std
  return np.argmax(x @ weights[:-1] + weights[-1], axis=-1)


def patch_probe(tokens: np.ndarray, patch_labels: np.ndarray, num_classes: int,
                background: int, fit_fraction: float = 0.5) -> dict:
  """Linear probe of per-patch labels on frozen tokens, split by image.

  tokens [B, N, D]; patch_labels int [B, N] in [0, num_classes); `background` = the background
  label. Fits on the first round(fit_fraction * B) images, scores on the rest. Returns
  {"probe_accuracy", "probe_object_accuracy", "probe_majority"} (see the module docstring)."""
  b, n, d = tokens.shape
  k = min(max(int(round(fit_fraction * b)), 1), b - 1)
  probe = fit_logistic_probe(tokens[:k].reshape(-1, d), patch_labels[:k].reshape(-1), num_classes)
  labels = patch_labels[k:].reshape(-1)
  pred = predict_probe(probe, tokens[k:].reshape(-1, d))
  obj = labels != background
  return {"probe_accuracy": float(np.mean(pred == labels)),
          "probe_object_accuracy": float(np.mean(pred[obj] == labels[obj])) if obj.any() else 0.0,
          "probe_majority": float(np.mean(~obj))}


def evaluate_tokens(config, tokens_fn: Callable[[jax.Array], jax.Array],
                    limit: int | None = None) -> dict:
  """token_similarity and the patch probe of `tokens_fn` (uint8 images [B, H, W, 3] -> tokens
  [B, N, D], N = (image_size / model.patch_size)^2) on the validation split of config.data, whose
  batches must carry "segmentation" (the built-in dataset). `limit`: at most that many images."""
  from vqkd_jax.train.evaluate import map_split
  from vqkd_jax.train.teacher import patch_targets

  grid = config.model.image_size // config.model.patch_size
  num_classes = config.data.num_classes

  @jax.jit
  def fn(batch):
    tokens = tokens_fn(batch["image"])
    return {"tokens": tokens, "token_similarity": token_similarity(tokens),
            "patch_labels": patch_targets(batch["segmentation"], grid, num_classes)}

  res = map_split(config, fn, limit=limit)
  out = {"token_similarity": float(np.mean(res["token_similarity"]))}
  out.update(patch_probe(res["tokens"], res["patch_labels"], num_classes + 1, num_classes))
  return out
