"""The in-the-box supervised ViT teacher (for the built-in dataset).

Outputs the last-layer patch tokens after the final LayerNorm (what VQ-KD distils, as upstream's
teachers), class logits from the CLS token, and per-patch logits over the classes plus "background".

Why a per-patch head: a classifier trained on pooled logits alone ends with nearly identical patch
tokens (`miniature-study.md`), and so does one whose every patch predicts the image's class (the
tokens then all encode the same label). The dense objective that train/teacher.py puts on
`patch_logits` (a patch mostly covered by the object -> the object's class, otherwise background, from
the dataset's segmentation) makes each token say what is at its own position: shape and position
survive in the tokens, so the distilled codes can carry them.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqkd_jax.nn.vit import ViTEncoder, dense, layer_norm

Dtype = Any


class SupervisedViT(nn.Module):
  """Images in [-1, 1] [B, H, W, 3] -> dict:
    tokens [B, N, width]: last-layer patch tokens after the final LayerNorm (CLS dropped), float32;
    logits [B, num_classes]: the CLS token's class logits (head "head");
    patch_logits [B, N, num_classes + 1]: per-patch logits (head "patch_head"); index num_classes is
      "background".
  N = (H / patch_size)^2. `train` is accepted for a uniform interface (no dropout)."""
  image_size: int
  patch_size: int
  width: int
  depth: int
  num_heads: int
  num_classes: int
  conv_stem: bool = True
  mlp_ratio: float = 4.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> dict:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = ViTEncoder(self.patch_size, self.width, self.depth, self.num_heads, self.mlp_ratio,
                   cls_token=True, conv_stem=self.conv_stem, image_size=self.image_size,
                   name="encoder", **kw)(images)
    x = layer_norm("norm", **kw)(x)
    cls, tokens = x[:, 0], x[:, 1:]
    logits = dense(self.num_classes, ("embed", "vocab"), "head", **kw)(cls)
    patch_logits = dense(self.num_classes + 1, ("embed", "vocab"), "patch_head", **kw)(tokens)
    return {"tokens": tokens.astype(jnp.float32), "logits": logits.astype(jnp.float32),
            "patch_logits": patch_logits.astype(jnp.float32)}
