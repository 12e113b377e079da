"""The in-the-box supervised ViT teacher (for the built-in dataset).

Outputs last-layer patch tokens after the final LayerNorm (what VQ-KD distils), pooled class logits
and per-patch logits over the classes plus "background". Training the per-patch head on where the
object is (train/teacher.py) keeps the patch tokens spatially meaningful: a classifier trained on its
pooled output alone ends with nearly identical patch tokens (`miniature-study.md`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from vqkd_jax.nn.vit import ViTEncoder, dense, layer_norm

Dtype = Any


class SupervisedViT(nn.Module):
  """Images in [-1, 1] [B, H, W, 3] -> {"tokens" [B, N, width], "logits" [B, C],
  "patch_logits" [B, N, C + 1]} (patch class C is "background")."""
  image_size: int
  patch_size: int
  width: int
  depth: int
  num_heads: int
  num_classes: int
  conv_stem: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False):
    x = ViTEncoder(self.image_size, self.patch_size, self.width, self.depth, self.num_heads,
                   cls_token=True, conv_stem=self.conv_stem, dtype=self.dtype, name="encoder")(images)
    x = layer_norm("norm", self.dtype)(x)
    cls, tokens = x[:, 0], x[:, 1:]
    head = dense(self.num_classes, ("embed", "vocab"), "head", dtype=self.dtype)
    patch_head = dense(self.num_classes + 1, ("embed", "vocab"), "patch_head", dtype=self.dtype)
    return {"tokens": tokens.astype(jnp.float32), "logits": head(cls).astype(jnp.float32),
            "patch_logits": patch_head(tokens).astype(jnp.float32)}
