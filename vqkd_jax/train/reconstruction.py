"""The reconstruction loss of the GAN-trained decoders: L1 and/or MSE plus a perceptual term.

VQGAN / FSQ (upstream §3.1): L1 + LPIPS, weights 1. Pixel decoder (LlamaGen recipe, §3.2 / §4):
MSE + LPIPS. The perceptual network is chosen by `perceptual` (train/perceptual.py: LPIPS from
converted weights, the in-the-box network offline, or none).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections


def reconstruction_config(**overrides) -> ml_collections.ConfigDict:
  """l1, mse: pixel-loss weights; perceptual: train/perceptual.py's group (weight inside)."""
  from vqkd_jax.train.perceptual import perceptual_config

  perceptual = overrides.pop("perceptual", None)
  base = dict(l1=1.0, mse=0.0)
  unknown = set(overrides) - set(base)
  if unknown:
    raise KeyError(f"unknown reconstruction fields {sorted(unknown)}; known: {sorted(base)}")
  base.update(overrides)
  c = ml_collections.ConfigDict(base)
  c.perceptual = perceptual if perceptual is not None else perceptual_config()
  return c


class ReconstructionLoss:
  """loss(frozen_vars, recon, target, rng, train) -> (scalar, metrics); images in [-1, 1] NHWC.
  `variables` is the perceptual network's (a frozen pytree for Objective.frozen; {} if none)."""

  def __init__(self, cfg, precision: str = "float32"):
    from vqkd_jax.train.perceptual import make_perceptual

    self.l1_weight, self.mse_weight = float(cfg.l1), float(cfg.mse)
    self.perceptual_weight = float(cfg.perceptual.weight)
    self.perceptual = (make_perceptual(cfg.perceptual, precision)
                       if cfg.perceptual.kind != "none" and self.perceptual_weight else None)
    self.variables = self.perceptual.variables if self.perceptual is not None else {}

  def __call__(self, frozen_vars, recon, target, rng=None, train=False):
    recon = recon.astype(jnp.float32)
    l1 = jnp.mean(jnp.abs(recon - target))
    mse = jnp.mean(jnp.square(recon - target))
    total = self.l1_weight * l1 + self.mse_weight * mse
    metrics = {"l1": l1, "mse": mse}
    if self.perceptual is not None:
      p = jnp.mean(self.perceptual.distance(jax.lax.stop_gradient(frozen_vars), recon, target,
                                            rng=rng, train=train))
      total = total + self.perceptual_weight * p
      metrics["perceptual"] = p
    return total, metrics
