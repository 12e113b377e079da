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
    restart_below: dead-code restart (not upstream's; 0 = off, the upstream recipe). Each training
      call keeps `usage_ema` [K], an EMA (decay `restart_decay`) of every code's count per global
      batch, starting at N / K; after the EMA update, the codes whose usage_ema is below
      `restart_below` are replaced by features of this global batch drawn at random (unit rows)
      and their usage_ema is reset to N / K. Short trainings need it: the k-means init sees the
      first batch of a random encoder, whose features later move away from most codes, which then
      never win an assignment again (measured on the demo: 8-30% of 256 codes used).
    restart_decay: the decay of usage_ema.

  State (collection "codebook"): `embedding` [K, D] unit rows (logical names codebook, code; starts
  as normalised N(0, 1) draws from the "params" RNG), `initialized` bool scalar; with restarts,
  `usage_ema` [K] float32.

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
  restart_below: float = 0.0
  restart_decay: float = 0.9

  def setup(self):
    def init_embedding():
      key = self.make_rng("params") if self.has_rng("params") else jax.random.PRNGKey(0)
      return nn.with_logical_partitioning(
          lambda k, s: l2_normalize(jax.random.normal(k, s, jnp.float32)),
          ("codebook", "code"))(key, (self.num_codes, self.code_dim))
    self.embedding = self.variable("codebook", "embedding", init_embedding)
    self.initialized = self.variable("codebook", "initialized", lambda: jnp.array(False))
    if self.restart_below > 0:
      self.usage_ema = self.variable("codebook", "usage_ema",
                                     lambda: jnp.full((self.num_codes,), -1.0, jnp.float32))

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

  def _restart_dead(self, codes: jax.Array, counts: jax.Array, x_normed: jax.Array,
                    key: jax.Array) -> jax.Array:
    """Replaces the codes whose usage EMA fell below `restart_below` by random unit features of
    the global batch (the same on every device); updates `usage_ema`."""
    total = jnp.sum(counts)
    fresh = total / self.num_codes
    old = self.usage_ema.value
    old = jnp.where(old < 0, fresh, old)  # -1 marks "never updated"
    usage = self.restart_decay * old + (1.0 - self.restart_decay) * counts
    dead = usage < self.restart_below
    k_local, k_pick = jax.random.split(key)
    n = x_normed.shape[0]
    rows = jax.random.randint(k_local, (self.num_codes,), 0, n)
    candidates = x_normed[rows]
    if self._cross_device():  # Each device proposes K rows; all devices pick the same K of them.
      candidates = jax.lax.all_gather(candidates, self.axis_name, tiled=True)
    pick = jax.random.permutation(k_pick, candidates.shape[0])[:self.num_codes]
    candidates = candidates[pick]
    self.usage_ema.value = jnp.where(dead, fresh, usage)
    return jnp.where(dead[:, None], candidates, codes)

  def __call__(self, x: jax.Array, train: bool = False) -> dict:
    """x [..., D] -> dict:
      quantized [..., D]: x_n + sg(e - x_n), x_n = l2norm(x), e the (updated) code (value = e,
        gradient = identity through x_n);
      indices int32 [...]: argmax cosine against the codebook before this step's update;
      commitment_loss: mean((l2norm(sg(e)) - x_n)^2) over all N * D entries (this device's rows);
      usage_counts float32 [K]: global histogram of this batch's indices.
    train=True updates the codebook (k-means init on the first such call, then EMA, then the
    dead-code restart when `restart_below` > 0)."""
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
      if self.restart_below > 0:
        codes = self._restart_dead(codes, counts, x_sg, jax.random.fold_in(key, 1))
      self.embedding.value = codes
      self.initialized.value = jnp.array(True)
    e = jax.lax.stop_gradient(jnp.take(codes, idx, axis=0))
    commitment = jnp.mean(jnp.square(l2_normalize(e) - x_n))
    quantized = x_n + jax.lax.stop_gradient(e - x_n)
    return {"quantized": quantized.reshape(*shape, self.code_dim).astype(x.dtype),
            "indices": idx.reshape(shape), "commitment_loss": commitment,
            "usage_counts": counts}


# ---------------------------------------------------------------------------------------------------
# Gradient-trained codebook (VQGAN, CVQ-VAE, Cluster) and the finite scalar quantizer (FSQ)


def pairwise_distance(x: jax.Array, codes: jax.Array, distance: str) -> jax.Array:
  """[N, D] x [K, D] -> [N, K] float32: squared Euclidean ("l2"; same argmin as torch.cdist) or
  1 - cos ("cosine"), in float32 at HIGHEST precision."""
  x = x.astype(jnp.float32)
  codes = codes.astype(jnp.float32)
  if distance == "cosine":
    return 1.0 - jnp.einsum("nd,kd->nk", l2_normalize(x), l2_normalize(codes), precision=_HIGHEST)
  if distance == "l2":
    cross = jnp.einsum("nd,kd->nk", x, codes, precision=_HIGHEST)
    return (jnp.sum(x * x, -1, keepdims=True) - 2.0 * cross + jnp.sum(codes * codes, -1)[None])
  raise ValueError(f"unknown distance {distance!r}: l2, cosine")


def anchor_decay(usage_ema: jax.Array, num_codes: int, ema: float = 0.99) -> jax.Array:
  """CVQ-VAE's per-code mixing weight (upstream §3.4): 1 - exp(-p_k K 10 / (1 - ema) - 1e-3).
  Used codes get ~1 (kept); dead codes (p ~ 0) get ~1e-3 (replaced by their anchor)."""
  return 1.0 - jnp.exp(-usage_ema * num_codes * 10.0 / (1.0 - ema) - 1e-3)


class VectorQuantizer(nn.Module):
  """A codebook trained by gradient (VQGAN §3.1; Cluster §3.7 with `anchors`), straight-through.

  Attributes:
    num_codes, code_dim: K and D.
    distance: "l2" (VQGAN) or "cosine" (CVQ-VAE, Cluster): the assignment argmin.
    beta: commitment weight: loss = codebook_weight * mean((z - sg(x))^2) + beta * mean((sg(z) - x)^2)
      (VQGAN: beta 0.25; Cluster: beta 0, the codebook loss alone).
    normalize: l2-normalise inputs and codes before assignment and loss (LlamaGen's NormalizeCallback).
    anchors: CVQ-VAE dead-code replacement (§3.4). The "codebook" collection holds `usage_ema` [K]
      (EMA `anchor_ema` of the global code frequency) and, from each training call, `anchor` [K, D]
      (every code's nearest feature in the global batch) and `anchor_weight` [K] = 1 - decay_k.
      This step's lookup already uses decay_k E_k + (1 - decay_k) anchor_k (as upstream's callback
      does before the decode); `apply_anchors` (Objective.after_update) then mixes the anchors into
      the optimizer-updated parameter, since a loss cannot write parameters.
    axis_name: pmap axis for the global statistics (None under jit).

  Params: `embedding` [K, D] (logical names codebook, code), init U(-1/K, 1/K) as upstream.
  """
  num_codes: int
  code_dim: int
  distance: str = "l2"
  beta: float = 0.25
  codebook_weight: float = 1.0
  normalize: bool = False
  anchors: bool = False
  anchor_ema: float = 0.99
  axis_name: Any = None

  def setup(self):
    k = self.num_codes
    init = lambda key, shape: jax.random.uniform(key, shape, jnp.float32, -1.0 / k, 1.0 / k)
    self.embedding = self.param("embedding", nn.with_logical_partitioning(init, ("codebook", "code")),
                                (self.num_codes, self.code_dim))
    if self.anchors:
      zeros = lambda *shape: (lambda: jnp.zeros(shape, jnp.float32))
      self.usage_ema = self.variable("codebook", "usage_ema", zeros(self.num_codes))
      self.anchor = self.variable("codebook", "anchor", zeros(self.num_codes, self.code_dim))
      self.anchor_weight = self.variable("codebook", "anchor_weight", zeros(self.num_codes))

  def _cross_device(self) -> bool:
    return self.axis_name is not None and not self.is_initializing()

  def codes(self) -> jax.Array:
    e = self.embedding.astype(jnp.float32)
    return l2_normalize(e) if self.normalize else e

  def lookup(self, indices: jax.Array) -> jax.Array:
    """Code vectors [..., D] of int indices [...] (normalised when `normalize`)."""
    return jnp.take(self.codes(), indices, axis=0)

  def _anchors(self, x: jax.Array, dist: jax.Array) -> jax.Array:
    """For each code the global batch's nearest feature: [N, D], [N, K] -> [K, D]."""
    best = jnp.min(dist, axis=0)
    nearest = jnp.take(x, jnp.argmin(dist, axis=0), axis=0)
    if self._cross_device():  # The device holding the globally nearest feature wins.
      all_best = jax.lax.all_gather(best, self.axis_name)           # [P, K]
      all_near = jax.lax.all_gather(nearest, self.axis_name)        # [P, K, D]
      winner = jnp.argmin(all_best, axis=0)
      nearest = jnp.take_along_axis(all_near, winner[None, :, None], axis=0)[0]
    return nearest

  def __call__(self, x: jax.Array, train: bool = False) -> dict:
    """x [..., D] -> dict: quantized [..., D] (x + sg(z - x)), indices int32 [...], loss,
    codebook_loss, commitment_loss (this device's mean), usage_counts [K] (global)."""
    shape = x.shape[:-1]
    if x.shape[-1] != self.code_dim:
      raise ValueError(f"expected features of dim {self.code_dim}, got {x.shape}")
    flat = x.reshape(-1, self.code_dim).astype(jnp.float32)
    if self.normalize:
      flat = l2_normalize(flat)
    codes = self.codes()
    dist = pairwise_distance(jax.lax.stop_gradient(flat), jax.lax.stop_gradient(codes), self.distance)
    idx = jnp.argmin(dist, axis=-1).astype(jnp.int32)
    counts = jnp.bincount(idx, length=self.num_codes).astype(jnp.float32)
    if self._cross_device():
      counts = jax.lax.psum(counts, self.axis_name)
    out = {}
    if self.anchors and train and not self.is_initializing():
      freq = counts / jnp.maximum(jnp.sum(counts), 1.0)
      p = self.anchor_ema * self.usage_ema.value + (1.0 - self.anchor_ema) * freq
      self.usage_ema.value = p
      decay = anchor_decay(p, self.num_codes, self.anchor_ema)
      anchor = jax.lax.stop_gradient(self._anchors(jax.lax.stop_gradient(flat), dist))
      self.anchor.value, self.anchor_weight.value = anchor, 1.0 - decay
      codes = decay[:, None] * codes + (1.0 - decay[:, None]) * anchor  # gradient still reaches E
    z = jnp.take(codes, idx, axis=0)
    codebook_loss = jnp.mean(jnp.square(z - jax.lax.stop_gradient(flat)))
    commitment = jnp.mean(jnp.square(jax.lax.stop_gradient(z) - flat))
    quantized = flat + jax.lax.stop_gradient(z - flat)
    out.update(quantized=quantized.reshape(*shape, self.code_dim).astype(x.dtype),
               indices=idx.reshape(shape),
               loss=self.codebook_weight * codebook_loss + self.beta * commitment,
               codebook_loss=codebook_loss, commitment_loss=commitment, usage_counts=counts)
    return out


def apply_anchors(params, model_state):
  """Objective.after_update for quantizers with `anchors`: every params subtree holding an
  `embedding` whose "codebook" state holds `anchor_weight` w and `anchor` a becomes
  (1 - w) E + w a (w = 0 before the first training step: unchanged)."""
  def walk(p, c):
    if not isinstance(p, dict) or not isinstance(c, dict):
      return p
    if "embedding" in p and "anchor_weight" in c:
      w = c["anchor_weight"][:, None]
      return dict(p, embedding=((1.0 - w) * p["embedding"] + w * c["anchor"]).astype(
          p["embedding"].dtype))
    return {k: walk(v, c.get(k, {})) for k, v in p.items()}

  return walk(params, (model_state or {}).get("codebook", {})), model_state


def fsq_bound(z: jax.Array, levels) -> jax.Array:
  """FSQ's bounding (upstream §3.3, eps 1e-3): per channel with L levels,
  half = (L - 1)(1 - eps) / 2, offset = 0.5 if L even else 0,
  bound(z) = tanh(z + atanh(offset / half)) * half - offset; rounding it gives the L integers
  -floor(L/2) .. ceil(L/2) - 1."""
  levels = jnp.asarray(levels, jnp.float32)
  half = (levels - 1.0) * (1.0 - 1e-3) / 2.0
  offset = jnp.where(jnp.mod(levels, 2) == 0, 0.5, 0.0)
  shift = jnp.arctanh(offset / half)
  return jnp.tanh(z + shift) * half - offset


def fsq_basis(levels) -> jnp.ndarray:
  """Mixed-radix place values: the first channel is the least significant digit."""
  import numpy as np
  return jnp.asarray(np.concatenate([[1], np.cumprod(levels[:-1])]).astype(np.int32))


def fsq_codes_to_indices(codes: jax.Array, levels) -> jax.Array:
  """Quantized codes in [-1, 1] [..., C] -> int32 token ids [...]: digit = code * (L // 2) + L // 2,
  id = sum_i digit_i prod_{j<i} L_j."""
  half = jnp.asarray([l // 2 for l in levels], jnp.float32)
  digits = jnp.round(codes.astype(jnp.float32) * half + half).astype(jnp.int32)
  return jnp.sum(digits * fsq_basis(levels), axis=-1).astype(jnp.int32)


def fsq_indices_to_codes(indices: jax.Array, levels) -> jax.Array:
  """Inverse of fsq_codes_to_indices: int ids [...] -> codes [..., C] = digit / (L // 2) - 1."""
  lv = jnp.asarray(levels, jnp.int32)
  digits = (indices[..., None] // fsq_basis(levels)) % lv
  half = jnp.asarray([l // 2 for l in levels], jnp.float32)
  return digits.astype(jnp.float32) / half - 1.0


class FSQ(nn.Module):
  """Finite scalar quantization (upstream §3.3): levels [8, 8, 5, 5, 5] (8000 codes) or
  [8, 8, 8, 5, 5, 5] (64000). No parameters, no loss.

  __call__(x [..., len(levels)]) -> dict: quantized [..., C] in [-1, 1] (round with a
  straight-through gradient of the bounding, divided by L // 2), indices int32 [...], loss 0,
  usage_counts [K] (global under pmap with axis_name)."""
  levels: tuple[int, ...]
  axis_name: Any = None

  @property
  def num_codes(self) -> int:
    import math
    return math.prod(self.levels)

  def lookup(self, indices: jax.Array) -> jax.Array:
    return fsq_indices_to_codes(indices, self.levels)

  def __call__(self, x: jax.Array, train: bool = False) -> dict:
    del train
    if x.shape[-1] != len(self.levels):
      raise ValueError(f"FSQ with {len(self.levels)} levels expects {len(self.levels)} channels, "
                       f"got {x.shape}")
    z = fsq_bound(x.astype(jnp.float32), self.levels)
    rounded = z + jax.lax.stop_gradient(jnp.round(z) - z)
    half = jnp.asarray([l // 2 for l in self.levels], jnp.float32)
    quantized = rounded / half
    idx = fsq_codes_to_indices(jax.lax.stop_gradient(quantized), self.levels)
    counts = jnp.bincount(idx.reshape(-1), length=self.num_codes).astype(jnp.float32)
    if self.axis_name is not None and not self.is_initializing():
      counts = jax.lax.psum(counts, self.axis_name)
    return {"quantized": quantized.astype(x.dtype), "indices": idx, "loss": jnp.zeros(()),
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
