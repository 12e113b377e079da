"""The evaluator network for FD_eval on the built-in dataset: a small ResNet-style CNN (another
architecture than the ViT teacher), GroupNorm so that it has no batch statistics."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from vqkd_jax.nn.conv import ResBlock, conv, group_norm
from vqkd_jax.nn.vit import dense

Dtype = Any


class EvaluatorNet(nn.Module):
  """Images in [-1, 1] [B, H, W, 3] -> {"features" [B, 4*width] (pooled, the FD_eval features),
  "logits" [B, num_classes]}. Three stages of ResBlocks at widths w, 2w, 4w with 2x downsampling."""
  num_classes: int
  width: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False):
    x = conv(self.width, 3, name="stem", dtype=self.dtype)(images.astype(self.dtype))
    for s, mult in enumerate((1, 2, 4)):
      x = ResBlock(self.width * mult, self.dtype, name=f"stage{s}_res0")(x)
      x = ResBlock(self.width * mult, self.dtype, name=f"stage{s}_res1")(x)
      if s < 2:
        x = conv(self.width * mult, 3, 2, name=f"stage{s}_down", dtype=self.dtype)(x)
    x = nn.silu(group_norm(x.shape[-1], "norm_out", self.dtype)(x))
    features = jnp.mean(x, axis=(1, 2)).astype(jnp.float32)
    logits = dense(self.num_classes, ("embed", "vocab"), "head", dtype=self.dtype)(features)
    return {"features": features, "logits": logits.astype(jnp.float32)}
