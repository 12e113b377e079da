"""Host-side metrics (numpy): reconstruction quality, codebook statistics, perplexity, accuracy.

All functions take numpy (or jax) arrays, compute in float64 on the host and return Python floats.
"""

from __future__ import annotations

import numpy as np


def _as_pixels(x, name: str) -> np.ndarray:
  x = np.asarray(x)
  if not np.issubdtype(x.dtype, np.integer):
    raise TypeError(f"{name} must be integer pixels in [0, 255] (uint8), got {x.dtype}; "
                    "convert images in [-1, 1] with evaluation.images.to_uint8 first")
  return x.astype(np.float64) / 255.0


def psnr_per_image(a_uint8, b_uint8, max_db: float = 100.0) -> np.ndarray:
  """PSNR of each image pair, in dB: -10 log10(MSE) with pixels in [0, 1] (uint8 / 255).

  a, b: uint8 [N, ...] (e.g. [N, H, W, 3]). Identical images (MSE 0) get `max_db`.
  """
  a, b = _as_pixels(a_uint8, "a"), _as_pixels(b_uint8, "b")
  if a.shape != b.shape:
    raise ValueError(f"shape mismatch: {a.shape} vs {b.shape}")
  if a.ndim < 2:
    raise ValueError(f"expected a batch of images [N, ...], got shape {a.shape}")
  mse = np.mean((a - b) ** 2, axis=tuple(range(1, a.ndim)))
  with np.errstate(divide="ignore"):
    db = -10.0 * np.log10(mse)
  return np.minimum(db, max_db)


def psnr(a_uint8, b_uint8, max_db: float = 100.0) -> float:
  """Mean over images of the per-image PSNR (see psnr_per_image), in dB."""
  return float(np.mean(psnr_per_image(a_uint8, b_uint8, max_db)))


def _histogram(counts) -> np.ndarray:
  c = np.asarray(counts, np.float64).reshape(-1)
  if c.size == 0 or np.any(c < 0) or not np.all(np.isfinite(c)):
    raise ValueError("counts must be a non-empty histogram of finite non-negative values")
  return c


def codebook_usage(counts) -> float:
  """Fraction (in [0, 1], not %) of codes used at least once; counts: [K] histogram of code uses."""
  return float(np.mean(_histogram(counts) >= 1))


def code_entropy(counts) -> float:
  """Shannon entropy of the code distribution counts / sum(counts), in nats (natural log).

  (Upstream VQ-KD logs this quantity as "codebook_ppl".) Raises on an all-zero histogram.
  """
  c = _histogram(counts)
  total = c.sum()
  if total <= 0:
    raise ValueError("empty histogram (all counts are zero)")
  p = c[c > 0] / total
  return float(-(p * np.log(p)).sum())


def code_perplexity(counts) -> float:
  """exp(entropy in nats): the effective number of codes in use, in [1, K]."""
  return float(np.exp(code_entropy(counts)))


def perplexity_from_nll(sum_nll, count) -> float:
  """exp(sum_nll / count): perplexity from a summed negative log-likelihood in nats over `count`
  predicted tokens (the paper's PPL of the proposal network)."""
  count = float(count)
  if count <= 0:
    raise ValueError(f"count must be positive, got {count}")
  return float(np.exp(float(sum_nll) / count))


def classification_accuracy(predictions, labels, mask=None) -> float:
  """Fraction (in [0, 1]) of correct predictions.

  predictions: logits/scores [N, C] (argmax over the last axis is taken) or class ids [N].
  labels: int [N]; mask: optional bool [N], False rows (padding) are ignored.
  """
  pred = np.asarray(predictions)
  labels = np.asarray(labels).reshape(-1)
  if pred.ndim == 2:
    pred = np.argmax(pred, axis=-1)
  pred = pred.reshape(-1)
  if pred.shape != labels.shape:
    raise ValueError(f"{pred.shape[0]} predictions for {labels.shape[0]} labels")
  correct = pred == labels
  if mask is not None:
    mask = np.asarray(mask).astype(bool).reshape(-1)
    correct = correct[mask]
  if correct.size == 0:
    raise ValueError("no examples to score")
  return float(np.mean(correct))


def inception_score(logits, splits: int = 10, shuffle: bool = True,
                    seed: int = 2020) -> tuple[float, float]:
  """Inception Score (mean, std over `splits`) from Inception logits [N, C], in float64.

  Per split: exp(mean_i KL(p(y|x_i) || p(y))) with p(y|x) = softmax over all C logits and p(y) the
  split's mean of p(y|x); returns the mean and the population std of the split scores. The
  conventions are torch-fidelity's (upstream's IS tool), which agree with improved-gan and OpenAI's
  evaluator: give the FID Inception's fc *without its bias* ("logits_unbiased", 1008 outputs,
  softmax over all of them); `shuffle` permutes the rows with np.random.RandomState(seed) first;
  split i holds rows [i N // splits, (i + 1) N // splits).
  """
  x = np.asarray(logits, np.float64)
  if x.ndim != 2 or x.shape[0] < splits or splits < 1:
    raise ValueError(f"logits must be [N, C] with N >= splits ({splits}), got shape {x.shape}")
  n = x.shape[0]
  if shuffle:
    x = x[np.random.RandomState(seed).permutation(n)]
  log_p = x - x.max(1, keepdims=True)
  log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
  p = np.exp(log_p)
  scores = []
  for i in range(splits):
    lo, hi = i * n // splits, (i + 1) * n // splits
    part, log_part = p[lo:hi], log_p[lo:hi]
    with np.errstate(divide="ignore", invalid="ignore"):
      log_q = np.log(part.mean(0))
      terms = np.where(part > 0, part * (log_part - log_q), 0.0)   # 0 log 0 = 0
    kl = terms.sum(1)
    scores.append(float(np.exp(kl.mean())))
  return float(np.mean(scores)), float(np.std(scores))
