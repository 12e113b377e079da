"""The evaluator network for FD_eval on the built-in dataset: a small ResNet-style CNN (another
architecture than the ViT teacher), GroupNorm so that it has no batch statistics."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqkd_jax.nn.conv import ResBlock, conv, group_norm
from vqkd_jax.nn.vit import dense

Dtype = Any


class EvaluatorNet(nn.Module):
  """Images in [-1, 1] [B, H, W, 3] -> {"features" [B, width * stage_mults[-1]] (global pool of the
  last stage after GN-SiLU: the FD_eval features), "logits" [B, num_classes], "stages": each stage's
  output map [B, h_s, w_s, width * mult_s] (the in-the-box perceptual loss's features)}.

  conv3x3 stem, then per stage `blocks_per_stage` ResBlocks at width * mult, a stride-2 conv between
  stages (32x32 -> 8x8 with the default three stages). `train` is accepted for a uniform interface.
  """
  num_classes: int
  width: int = 32
  stage_mults: Sequence[int] = (1, 2, 4)
  blocks_per_stage: int = 2
  pool: str = "max"
  stem_stride: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> dict:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = conv(self.width, 3, self.stem_stride, name="stem", **kw)(images.astype(self.dtype))
    stages = []
    for s, mult in enumerate(self.stage_mults):
      for r in range(self.blocks_per_stage):
        x = ResBlock(self.width * mult, name=f"stage{s}_res{r}", **kw)(x)
      stages.append(x.astype(jnp.float32))
      if s < len(self.stage_mults) - 1:
        x = conv(self.width * mult, 3, 2, name=f"stage{s}_down", **kw)(x)
    x = nn.silu(group_norm(x.shape[-1], "norm_out", **kw)(x))
    x = x.astype(jnp.float32)
    if self.pool == "mean":
      features = jnp.mean(x, axis=(1, 2))
    elif self.pool == "max":
      features = jnp.max(x, axis=(1, 2))
    else:
      features = jnp.concatenate([jnp.mean(x, axis=(1, 2)), jnp.max(x, axis=(1, 2))], -1)
    logits = dense(self.num_classes, ("embed", "vocab"), "head", **kw)(features)
    return {"features": features, "logits": logits.astype(jnp.float32), "stages": stages}
