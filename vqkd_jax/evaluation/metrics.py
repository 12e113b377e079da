"""Host-side metrics (numpy): reconstruction quality and codebook statistics."""

from __future__ import annotations

import numpy as np


def psnr(a_uint8: np.ndarray, b_uint8: np.ndarray) -> float:
  """Mean over images of -10 log10(MSE) with pixels in [0, 1] (uint8 / 255), in dB."""
  a = np.asarray(a_uint8, np.float64) / 255.0
  b = np.asarray(b_uint8, np.float64) / 255.0
  mse = np.mean((a - b) ** 2, axis=tuple(range(1, a.ndim)))
  return float(np.mean(-10 * np.log10(np.maximum(mse, 1e-12))))


def codebook_usage(counts: np.ndarray) -> float:
  """Fraction of codes used at least once (counts: [K] histogram)."""
  counts = np.asarray(counts)
  return float(np.mean(counts > 0))


def code_entropy(counts: np.ndarray) -> float:
  """Shannon entropy of the code histogram, in nats (upstream's "codebook_ppl")."""
  p = np.asarray(counts, np.float64)
  p = p[p > 0] / p.sum()
  return float(-(p * np.log(p)).sum())


def code_perplexity(counts: np.ndarray) -> float:
  """exp(entropy): the effective number of codes in use."""
  return float(np.exp(code_entropy(counts)))
