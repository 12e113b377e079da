"""Vector quantizers as Linen modules with explicit non-gradient state, and codebook statistics.

`CosineCodebook` is VQ-KD's codebook (upstream §3.5, vq/algorithms/vqkd/quantizers/callbacks.py):
l2-normalised codes, cosine assignment, no gradient to the codebook, a spherical k-means init on the
first global training batch, and an EMA update (decay 0.99) applied after the assignment but before
the same step's lookup. Statistics are global: under jit the arrays are global already
(axis_name=None); under pmap `axis_name` names the axis to psum / all_gather over.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||, eps) along `axis` (torch.nn.functional.normalize)."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
  return x / jnp.maximum(norm, eps)


def cosine_assign(x_normed: jax.Array, codes_normed: jax.Array,
                  chunk_size: int | None = None) -> jax.Array:
  """Index of the most similar code of each row (argmax cosine = upstream's argmin 1 - cos; the first
  index on ties): [N, D] x [K, D] -> int32 [N]. Float32 (HIGHEST precision) similarities; with
  `chunk_size`, rows go through in chunks of that many (bounds the [chunk, K] similarity memory)."""
  def assign(x):
    sim = jnp.einsum("nd,kd->nk", x, codes_normed, precision=_HIGHEST,
                     preferred_element_type=jnp.float32)
    return jnp.argmax(sim, axis=-1).astype(jnp.int32)

  n, d = x_normed.shape
  if chunk_size is None or n <= chunk_size:
    return assign(x_normed)
  pad = (-n) % chunk_size
  chunks = jnp.pad(x_normed, ((0, pad), (0, 0))).reshape(-1, chunk_size, d)
  return jax.lax.map(assign, chunks).reshape(-1)[:n]


def _kmeans_chunk(n: int, k: int) -> int | None:
  """Rows per chunk that keep the [rows, K] similarities near 2^28 floats (1 GiB); None: one go."""
  return None if n * k <= 2 ** 28 else max(2 ** 28 // k, 1)


def spherical_kmeans(x: jax.Array, num_codes: int, iters: int = 10, key: jax.Array | None = None,
                     init: jax.Array | None = None) -> jax.Array:
  """Spherical k-means of the rows of x [N, D] -> unit-norm centroids [K, D] (upstream's lazy init).

  N >= K: start from the rows `jax.random.permutation(key, N)[:K]` of l2norm(x) (K distinct random
  vectors; key None: PRNGKey(0)), then `iters` times: assign each row to its most similar centroid,
  move every centroid with assignments to the mean of its unit vectors (an empty cluster keeps its
  centroid), renormalise. N < K (as upstream): the first N codes are l2norm(x), the rest keep
  l2norm(init) (random unit vectors from `key` when init is None), no iterations.
  """
  x = l2_normalize(x.astype(jnp.float32))
  n, d = x.shape
  key = jax.random.PRNGKey(0) if key is None else key
  if n < num_codes:
    if init is None:
      init = jax.random.normal(jax.random.fold_in(key, 1), (num_codes, d))
    return l2_normalize(jnp.concatenate([x, init[n:].astype(jnp.float32)], axis=0))
  codes = x[jax.random.permutation(key, n)[:num_codes]]
  chunk = _kmeans_chunk(n, num_codes)

  def step(codes, _):
    codes = l2_normalize(codes)
    idx = cosine_assign(x, codes, chunk)
    sums = jax.ops.segment_sum(x, idx, num_segments=num_codes)
    counts = jnp.bincount(idx, length=num_codes).astype(jnp.float32)
    return segment_mean_or_keep(sums, counts, codes), None

  codes, _ = jax.lax.scan(step, codes, None, length=iters)
  return l2_normalize(codes)


def segment_mean_or_keep(sums: jax.Array, counts: jax.Array, codes: jax.Array) -> jax.Array:
  """where(count > 0, sum / count, code) per row: [K, D], [K], [K, D] -> [K, D]."""
  return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts[:, None], 1.0), codes)


def ema_update(codes: jax.Array, sums: jax.Array, counts: jax.Array, decay: float,
               normalize_centroid: bool = True) -> jax.Array:
  """One EMA step of unit-norm codes [K, D] toward the mean of their assigned unit vectors:
  c = where(count > 0, sum / count, E); c <- l2norm(c) when `normalize_centroid`;
  E <- l2norm(decay * E + (1 - decay) * c).

  Upstream's code (VQKDCallback.after_encode) normalises the centroid before the EMA
  (`normalize_centroid=True`, the default); upstream.md §12 writes the formula without it."""
  centroid = segment_mean_or_keep(sums, counts, codes)
  if normalize_centroid:
    centroid = l2_normalize(centroid)
  return l2_normalize(decay * codes + (1.0 - decay) * centroid)


class CosineCodebook(nn.Module):
  """VQ-KD's cosine codebook, not trained by gradient.

  Attributes:
    num_codes, code_dim: K and D.
    decay: EMA decay (0.99 upstream).
    kmeans_iters: spherical k-means iterations of the lazy init (10 upstream).
    axis_name: pmap axis to sum statistics and gather k-means features over (None under jit).
    normalize_centroid: see `ema_update` (True = upstream's code).

  State (collection "codebook"): `embedding` [K, D] unit rows (logical names codebook, code; starts
  as normalised N(0, 1) draws from the "params" RNG), `initialized` bool scalar.

  The k-means init happens at the first call with train=True (while `initialized` is False), on the
  globally gathered batch; its random choice of K rows uses the "codebook" RNG stream when one is
  given, else PRNGKey(0). Under pmap every device must get the same "codebook" key (the train loop
  passes one key per step to all devices) so that every device computes the same init.
  """
  num_codes: int
  code_dim: int
  decay: float = 0.99
  kmeans_iters: int = 10
  axis_name: Any = None
  normalize_centroid: bool = True

  def setup(self):
    def init_embedding():
      key = self.make_rng("params") if self.has_rng("params") else jax.random.PRNGKey(0)
      return nn.with_logical_partitioning(
          lambda k, s: l2_normalize(jax.random.normal(k, s, jnp.float32)),
          ("codebook", "code"))(key, (self.num_codes, self.code_dim))
    self.embedding = self.variable("codebook", "embedding", init_embedding)
    self.initialized = self.variable("codebook", "initialized", lambda: jnp.array(False))

  def _cross_device(self) -> bool:
    # Init runs outside pmap: there is no axis to reduce over then.
    return self.axis_name is not None and not self.is_initializing()

  def _psum(self, x: jax.Array) -> jax.Array:
    return jax.lax.psum(x, self.axis_name) if self._cross_device() else x

  def codes(self) -> jax.Array:
    """The current unit-norm codes [K, D] (float32)."""
    return l2_normalize(self.embedding.value.astype(jnp.float32))

  def lookup(self, indices: jax.Array) -> jax.Array:
    """Unit-norm code vectors of int indices [...] -> [..., D]."""
    return jnp.take(self.codes(), indices, axis=0)

  def _kmeans_init(self, x_normed: jax.Array, codes: jax.Array, key: jax.Array) -> jax.Array:
    # Gathered inside the branch: the all_gather runs only at the init step.
    gathered = (jax.lax.all_gather(x_normed, self.axis_name, tiled=True)
                if self._cross_device() else x_normed)
    return spherical_kmeans(gathered, self.num_codes, self.kmeans_iters, key, init=codes)

  def __call__(self, x: jax.Array, train: bool = False) -> dict:
    """x [..., D] -> dict:
      quantized [..., D]: x_n + sg(e - x_n), x_n = l2norm(x), e the (updated) code (value = e,
        gradient = identity through x_n);
      indices int32 [...]: argmax cosine against the codebook before this step's update;
      commitment_loss: mean((l2norm(sg(e)) - x_n)^2) over all N * D entries (this device's rows);
      usage_counts float32 [K]: global histogram of this batch's indices.
    train=True updates the codebook (k-means init on the first such call, then EMA)."""
    shape = x.shape[:-1]
    if x.shape[-1] != self.code_dim:
      raise ValueError(f"expected features of dim {self.code_dim}, got {x.shape}")
    x_n = l2_normalize(x.reshape(-1, self.code_dim).astype(jnp.float32))
    x_sg = jax.lax.stop_gradient(x_n)
    codes = self.codes()
    update = train and not self.is_initializing()
    if update:
      key = self.make_rng("codebook") if self.has_rng("codebook") else jax.random.PRNGKey(0)
      codes = jax.lax.cond(self.initialized.value, lambda: codes,
                           lambda: self._kmeans_init(x_sg, codes, key))
    idx = cosine_assign(x_sg, codes)
    counts = self._psum(jnp.bincount(idx, length=self.num_codes).astype(jnp.float32))
    if update:
      sums = self._psum(jax.ops.segment_sum(x_sg, idx, num_segments=self.num_codes))
      codes = ema_update(codes, sums, counts, self.decay, self.normalize_centroid)
      self.embedding.value = codes
      self.initialized.value = jnp.array(True)
    e = jax.lax.stop_gradient(jnp.take(codes, idx, axis=0))
    commitment = jnp.mean(jnp.square(l2_normalize(e) - x_n))
    quantized = x_n + jax.lax.stop_gradient(e - x_n)
    return {"quantized": quantized.reshape(*shape, self.code_dim).astype(x.dtype),
            "indices": idx.reshape(shape), "commitment_loss": commitment,
            "usage_counts": counts}


# ---------------------------------------------------------------------------------------------------
# Codebook statistics of a histogram of code indices (jit-friendly; numpy versions: evaluation.metrics)


def codebook_usage(counts: jax.Array) -> jax.Array:
  """Fraction of codes with a nonzero count: [K] -> scalar in [0, 1]."""
  return jnp.mean((jnp.asarray(counts) > 0).astype(jnp.float32))


def code_entropy(counts: jax.Array) -> jax.Array:
  """Entropy (nats) of the code histogram [K] normalised to a distribution."""
  counts = jnp.asarray(counts, jnp.float32)
  p = counts / jnp.maximum(counts.sum(), 1e-12)
  return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))


def code_perplexity(counts: jax.Array) -> jax.Array:
  """exp(code_entropy(counts)): the effective number of codes used."""
  return jnp.exp(code_entropy(counts))
