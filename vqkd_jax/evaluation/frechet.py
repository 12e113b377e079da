"""Fréchet distance between Gaussians fitted to features, accumulated in float64 on the host.

`frechet_distance` computes tr sqrtm(S1 S2) through a symmetric eigen-decomposition
(sqrt(S1) S2 sqrt(S1) is symmetric PSD and has the eigenvalues of S1 S2), which is exact in float64
and about 10x faster than scipy.linalg.sqrtm on 2048-d statistics.
"""

from __future__ import annotations

import numpy as np


class FeatureStatistics:
  """Running count, sum and sum of outer products of features, in float64."""

  def __init__(self, dim: int | None = None):
    self.count = 0
    self.sum = None if dim is None else np.zeros(dim)
    self.outer = None if dim is None else np.zeros((dim, dim))

  def update(self, features: np.ndarray, mask: np.ndarray | None = None) -> None:
    """features [n, d]; rows where `mask` is False are ignored (padding)."""
    f = np.asarray(features, np.float64)
    if mask is not None:
      f = f[np.asarray(mask, bool)]
    if self.sum is None:
      self.sum, self.outer = np.zeros(f.shape[1]), np.zeros((f.shape[1], f.shape[1]))
    self.count += f.shape[0]
    self.sum += f.sum(0)
    self.outer += f.T @ f

  def mean(self) -> np.ndarray:
    return self.sum / self.count

  def covariance(self) -> np.ndarray:
    """Unbiased covariance (as np.cov)."""
    mu = self.mean()
    return (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1)

  def save(self, path: str) -> None:
    np.savez(path, count=self.count, sum=self.sum, outer=self.outer)

  @classmethod
  def load(cls, path: str) -> "FeatureStatistics":
    with np.load(path, allow_pickle=False) as f:
      s = cls()
      s.count, s.sum, s.outer = int(f["count"]), f["sum"], f["outer"]
    return s


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
  w, v = np.linalg.eigh((m + m.T) / 2)
  return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr sqrtm(S1 S2), in float64."""
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  root1 = _sqrt_psd(s1)
  eig = np.linalg.eigvalsh(root1 @ s2 @ root1)
  tr_covmean = np.sum(np.sqrt(np.clip(eig, 0, None)))
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)
