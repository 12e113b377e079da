"""The ViT trunk of the in-the-box self-supervised teachers (MAE, CLIP and DINO styles).

ViTEncoder (nn/vit.py) with two ways of hiding patches, which the self-supervised objectives need:
`keep` (MAE: only the visible patches enter the transformer) and `mask` (iBOT: hidden patches are
replaced by a learned mask token). With the convolutional stem, the pixels of hidden patches are set
to 0 before the stem, so that no pixel of a hidden patch reaches any token through the stem's
overlapping 3x3 receptive fields. Its output is already after the final LayerNorm.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqkd_jax.nn.vit import PatchEmbed, ViTBlock, layer_norm

Dtype = Any


def visible_pixels(visible: jax.Array, grid: int, patch_size: int) -> jax.Array:
  """Per-patch visibility [B, grid*grid] (1 = visible) -> per-pixel [B, grid*p, grid*p, 1]."""
  b = visible.shape[0]
  v = visible.reshape(b, grid, 1, grid, 1).astype(jnp.float32)
  v = jnp.broadcast_to(v, (b, grid, patch_size, grid, patch_size))
  return v.reshape(b, grid * patch_size, grid * patch_size, 1)


def keep_to_visible(keep: jax.Array, num_patches: int) -> jax.Array:
  """Indices of the visible patches [B, n] -> visibility [B, num_patches] (1 = visible), float32."""
  b = keep.shape[0]
  return jnp.zeros((b, num_patches), jnp.float32).at[jnp.arange(b)[:, None], keep].set(1.0)


class PatchViT(nn.Module):
  """Images in [-1, 1] [B, H, W, 3] -> tokens [B, 1 + n, D] after the final LayerNorm, CLS first.

  keep: int [B, n] indices of the visible patches (raster order of the g x g grid, g = H / p);
    None = all N = g*g patches (n = N). Position embeddings are added before the gather, so the
    order of `keep` is the order of the output tokens.
  mask: bool [B, N] (True = hidden): hidden patch embeddings are replaced by the learned
    `mask_token` (created when `use_mask_token`); None = nothing hidden.
  Parameters: patch_embed (nn/vit.py PatchEmbed), pos_embed [1, 1 + N, D] (CLS position first),
  cls_token [1, 1, D], block{i} (pre-LN ViTBlock, BEiT depth-scaled init), norm. pos_init_std:
  the position embeddings' initial std (ViT's 0.02; larger makes places salient from the start).
  """
  image_size: int
  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  conv_stem: bool = True
  use_mask_token: bool = False
  pos_init_std: float = 0.02
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, keep: jax.Array | None = None,
               mask: jax.Array | None = None) -> jax.Array:
    g = self.image_size // self.patch_size
    n_patches, d = g * g, self.width
    if images.shape[1] != self.image_size or images.shape[2] != self.image_size:
      raise ValueError(f"PatchViT expects {self.image_size}x{self.image_size} images, got "
                       f"{images.shape[1]}x{images.shape[2]}")
    if keep is not None and mask is not None:
      raise ValueError("pass keep (MAE) or mask (iBOT), not both")
    images = images.astype(self.dtype)
    hidden = None
    if keep is not None:
      hidden = 1.0 - keep_to_visible(keep, n_patches)
    elif mask is not None:
      hidden = mask.astype(jnp.float32)
    if hidden is not None and self.conv_stem:
      images = images * visible_pixels(1.0 - hidden, g, self.patch_size).astype(self.dtype)
    x = PatchEmbed(self.patch_size, self.width, self.conv_stem, self.dtype, self.param_dtype,
                   name="patch_embed")(images)
    b = x.shape[0]
    x = x.reshape(b, n_patches, d)
    if self.use_mask_token:
      mask_token = self.param("mask_token", nn.with_logical_partitioning(
          nn.initializers.truncated_normal(0.02), (None, None, "embed")), (1, 1, d),
          self.param_dtype)
      if mask is not None:
        x = jnp.where(mask[..., None], mask_token.astype(x.dtype), x)
    elif mask is not None:
      raise ValueError("mask given but the model has no mask token (use_mask_token=False)")
    pos = self.param("pos_embed", nn.with_logical_partitioning(
        nn.initializers.truncated_normal(self.pos_init_std), (None, None, "embed")),
        (1, 1 + n_patches, d),
        self.param_dtype).astype(x.dtype)
    x = x + pos[:, 1:]
    if keep is not None:
      x = jnp.take_along_axis(x, keep[..., None], axis=1)
    cls = self.param("cls_token", nn.with_logical_partitioning(
        nn.initializers.truncated_normal(0.02), (None, None, "embed")), (1, 1, d),
        self.param_dtype).astype(x.dtype) + pos[:, :1]
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)), x], axis=1)
    for i in range(self.depth):
      x = ViTBlock(self.num_heads, self.mlp_ratio, i, self.dtype, self.param_dtype,
                   name=f"block{i}")(x)
    return layer_norm("norm", self.dtype, param_dtype=self.param_dtype)(x)

