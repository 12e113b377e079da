"""Vector quantizers as Linen modules with explicit non-gradient state.

`CosineCodebook` is VQ-KD's codebook (upstream §3.5): l2-normalised codes, cosine assignment, EMA
updates (decay 0.99) applied before the same step's lookup, spherical k-means initialisation on the
first global training batch, no gradient to the codebook. Statistics are global: under jit the arrays
are global already; under pmap `axis_name` names the axis to sum over.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||, eps) along `axis` (as torch.nn.functional.normalize)."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
  return x / jnp.maximum(norm, eps)


def cosine_assign(x_normed: jax.Array, codes_normed: jax.Array) -> jax.Array:
  """Index of the most similar code for each row: [N, D] x [K, D] -> int32 [N]."""
  sim = jnp.einsum("nd,kd->nk", x_normed, codes_normed, precision=jax.lax.Precision.HIGHEST)
  return jnp.argmax(sim, axis=-1).astype(jnp.int32)


def spherical_kmeans(x: jax.Array, num_codes: int, iters: int, key: jax.Array) -> jax.Array:
  """Spherical k-means on rows of x [N, D] -> unit-norm centroids [K, D].

  Init: K distinct random rows (`jax.random.permutation(key, N)[:K]`); if N < K, the first N codes
  are the rows and the rest are random unit vectors. Each iteration: assign by cosine, centroid =
  mean of the assigned unit vectors (an empty cluster keeps its centroid), renormalise.
  """
  x = l2_normalize(x.astype(jnp.float32))
  n, d = x.shape
  perm_key, fill_key = jax.random.split(key)
  if n >= num_codes:
    codes = x[jax.random.permutation(perm_key, n)[:num_codes]]
  else:
    fill = l2_normalize(jax.random.normal(fill_key, (num_codes - n, d)))
    codes = jnp.concatenate([x, fill])

  def step(codes, _):
    codes = l2_normalize(codes)
    idx = cosine_assign(x, codes)
    sums = jax.ops.segment_sum(x, idx, num_segments=num_codes)
    counts = jax.ops.segment_sum(jnp.ones((n,), jnp.float32), idx, num_segments=num_codes)
    codes = jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts[:, None], 1), codes)
    return codes, None

  codes, _ = jax.lax.scan(step, codes, None, length=iters)
  return l2_normalize(codes)


def ema_update(codes: jax.Array, sums: jax.Array, counts: jax.Array, decay: float) -> jax.Array:
  """One EMA step of unit-norm codes toward the mean of their assigned unit vectors:
  E <- l2norm(decay * E + (1 - decay) * where(count > 0, sum / count, E))."""
  centroid = jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts[:, None], 1.0), codes)
  return l2_normalize(decay * codes + (1 - decay) * centroid)


class CosineCodebook(nn.Module):
  """VQ-KD's codebook.

  Attributes:
    num_codes, code_dim: K and D.
    decay: EMA decay (0.99 upstream).
    kmeans_iters: spherical k-means iterations of the lazy init (10 upstream).
    axis_name: pmap axis to sum statistics over (None under jit).

  State (collection "codebook"): `embedding` [K, D] unit rows, `initialized` bool.
  The k-means init draws from the "codebook" RNG stream when given, else from a fixed key.
  """
  num_codes: int
  code_dim: int
  decay: float = 0.99
  kmeans_iters: int = 10
  axis_name: Any = None

  def setup(self):
    init = lambda: l2_normalize(jax.random.normal(self.make_rng("params") if self.is_initializing()
                                                  else jax.random.PRNGKey(0),
                                                  (self.num_codes, self.code_dim)))
    self.embedding = self.variable(
        "codebook", "embedding",
        lambda: nn.with_logical_partitioning(lambda: init(), ("codebook", "code"))())
    self.initialized = self.variable("codebook", "initialized", lambda: jnp.array(False))

  def _sum(self, x):
    # Init runs outside pmap: no axis to sum over there.
    return jax.lax.psum(x, self.axis_name) if self.axis_name and not self.is_initializing() else x

  def codes(self) -> jax.Array:
    """The current unit-norm codes [K, D]."""
    return l2_normalize(nn.unbox(self.embedding.value))

  def lookup(self, indices: jax.Array) -> jax.Array:
    """Unit-norm code vectors for int indices [...] -> [..., D]."""
    return jnp.take(self.codes(), indices, axis=0)

  def __call__(self, x: jax.Array, train: bool = False) -> dict:
    """x [..., D] -> {"quantized" (STE, [..., D]), "indices" [...], "commitment_loss",
    "usage_counts" [K] (global code histogram of this batch)}."""
    shape = x.shape[:-1]
    flat = l2_normalize(x.reshape(-1, self.code_dim).astype(jnp.float32))
    codes = self.codes()
    if train and not self.is_initializing():
      gathered = (jax.lax.all_gather(flat, self.axis_name, tiled=True) if self.axis_name else flat)
      # Under pmap the caller passes the same key to every device: identical k-means everywhere.
      key = (self.make_rng("codebook") if self.has_rng("codebook") else jax.random.PRNGKey(0))
      codes = jax.lax.cond(
          self.initialized.value, lambda: codes,
          lambda: spherical_kmeans(jax.lax.stop_gradient(gathered), self.num_codes,
                                   self.kmeans_iters, key))
      idx = cosine_assign(jax.lax.stop_gradient(flat), codes)
      sums = self._sum(jax.ops.segment_sum(jax.lax.stop_gradient(flat), idx, self.num_codes))
      counts = self._sum(jax.ops.segment_sum(jnp.ones(idx.shape, jnp.float32), idx,
                                             self.num_codes))
      codes = ema_update(codes, sums, counts, self.decay)
      self.embedding.value = _rebox(self.embedding.value, codes)
      self.initialized.value = jnp.array(True)
    codes = jax.lax.stop_gradient(codes)
    idx = cosine_assign(jax.lax.stop_gradient(flat), codes)
    z = codes[idx]
    counts = self._sum(jax.ops.segment_sum(jnp.ones(idx.shape, jnp.float32), idx, self.num_codes))
    commitment = jnp.mean(jnp.square(l2_normalize(z) - flat))
    if self.axis_name and not self.is_initializing():
      commitment = jax.lax.pmean(commitment, self.axis_name)
    quantized = flat + jax.lax.stop_gradient(z - flat)
    return {"quantized": quantized.reshape(*shape, self.code_dim).astype(x.dtype),
            "indices": idx.reshape(shape), "commitment_loss": commitment,
            "usage_counts": counts}


def _rebox(old, value):
  return old.replace_boxed(value) if isinstance(old, nn.meta.AxisMetadata) else value


def codebook_usage(counts: jax.Array) -> jax.Array:
  """Fraction of codes with a nonzero count."""
  return jnp.mean((counts > 0).astype(jnp.float32))


def code_perplexity(counts: jax.Array) -> jax.Array:
  """exp(entropy in nats) of the code histogram."""
  p = counts / jnp.maximum(counts.sum(), 1)
  return jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1)), 0.0)))
