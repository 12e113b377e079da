"""The in-the-box MAE-style teacher: a masked autoencoder trained on the built-in dataset.

A ViT encoder (in_the_box_encoder.PatchViT, convolutional stem) sees only a random subset of the
patches; a light decoder gets the encoded visible tokens back at their places, a learned mask token
at the hidden ones, and predicts the pixels of every patch; the loss (`masked_patch_loss`) counts
the hidden patches only, against their pixels, per-patch normalised or not (MAE's norm_pix_loss),
as He et al. 2022.

Teacher tokens (what VQ-KD distils, as upstream's MAE teacher): the encoder run on the whole image,
no masking, last layer after the final LayerNorm, CLS dropped (`MaskedAutoencoder.tokens`).
Reconstructing hidden pixels from their neighbours makes every token describe its own place (object
part or background there), so the tokens keep spatial meaning.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqkd_jax.nn.vit import ViTBlock, dense, layer_norm
from vqkd_jax.teachers.in_the_box_encoder import PatchViT

Dtype = Any


def random_keep(rng: jax.Array, batch: int, num_patches: int, num_keep: int) -> jax.Array:
  """Indices of the visible patches, int32 [batch, num_keep]: a uniformly random subset of
  [0, num_patches) per example (argsort of uniform noise, as MAE's random_masking), sorted."""
  noise = jax.random.uniform(rng, (batch, num_patches))
  return jnp.sort(jnp.argsort(noise, axis=1)[:, :num_keep], axis=1).astype(jnp.int32)


def num_visible(num_patches: int, mask_ratio: float) -> int:
  """How many patches stay visible at `mask_ratio` (MAE: int(N * (1 - ratio)), at least 1)."""
  if not 0.0 <= mask_ratio < 1.0:
    raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
  return max(int(num_patches * (1.0 - mask_ratio)), 1)


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
  """[B, H, W, C] -> [B, (H/p)*(W/p), p*p*C]: patches in raster order, pixels (row, col, channel).
  """
  b, h, w, c = images.shape
  p = patch_size
  x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def normalised_patches(patches: jax.Array, eps: float = 1e-6) -> jax.Array:
  """Each patch [..., P] minus its mean, over sqrt(its (biased) variance + eps) (norm_pix_loss)."""
  mean = patches.mean(axis=-1, keepdims=True)
  var = patches.var(axis=-1, keepdims=True)
  return (patches - mean) / jnp.sqrt(var + eps)


def masked_patch_loss(pred: jax.Array, target: jax.Array, hidden: jax.Array) -> jax.Array:
  """Mean over hidden patches of the per-patch mean squared error.

  pred, target [B, N, P]; hidden [B, N] (1 = hidden, 0 = visible). Visible patches count nothing."""
  per_patch = jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)), axis=-1)
  hidden = hidden.astype(jnp.float32)
  return jnp.sum(per_patch * hidden) / jnp.maximum(jnp.sum(hidden), 1.0)


class MaeDecoder(nn.Module):
  """Encoded tokens [B, 1 + n, D] (CLS first, visible patches in `keep` order) and keep [B, n] ->
  predicted pixels of every patch [B, N, out_dim].

  Dense to the decoder width, the visible tokens put back at their places and `mask_token`
  elsewhere, learned position embeddings, `depth` pre-LN blocks, LayerNorm, Dense(out_dim)."""
  num_patches: int
  out_dim: int
  width: int
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, encoded: jax.Array, keep: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = dense(self.width, ("embed", "mlp"), "embed", **kw)(encoded)
    b, d = x.shape[0], self.width
    mask_token = self.param("mask_token", nn.with_logical_partitioning(
        nn.initializers.truncated_normal(0.02), (None, None, "embed")), (1, 1, d),
        self.param_dtype)
    full = jnp.broadcast_to(mask_token.astype(x.dtype), (b, self.num_patches, d))
    full = full.at[jnp.arange(b)[:, None], keep].set(x[:, 1:])
    x = jnp.concatenate([x[:, :1], full], axis=1)
    pos = self.param("pos_embed", nn.with_logical_partitioning(
        nn.initializers.truncated_normal(0.02), (None, None, "embed")),
        (1, 1 + self.num_patches, d), self.param_dtype)
    x = x + pos.astype(x.dtype)
    for i in range(self.depth):
      x = ViTBlock(self.num_heads, self.mlp_ratio, i, name=f"block{i}", **kw)(x)
    x = layer_norm("norm", **kw)(x)
    return dense(self.out_dim, ("embed", "mlp"), "pred", **kw)(x[:, 1:]).astype(jnp.float32)


class MaskedAutoencoder(nn.Module):
  """MAE over images in [-1, 1] [B, H, W, 3] (H = W = image_size).

  __call__(images, keep) -> {"pred": [B, N, p*p*3] pixels of every patch (float32)}; keep int [B, n]
    = the visible patches (`random_keep`).
  tokens(images) -> [B, N, width] float32: the unmasked encoder's patch tokens after the final
    LayerNorm (CLS dropped): the teacher tokens.
  """
  image_size: int
  patch_size: int
  width: int
  depth: int
  num_heads: int
  decoder_width: int = 64
  decoder_depth: int = 2
  decoder_heads: int = 4
  conv_stem: bool = True
  pos_init_std: float = 0.02
  mlp_ratio: float = 4.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.encoder = PatchViT(self.image_size, self.patch_size, self.width, self.depth,
                            self.num_heads, self.mlp_ratio, self.conv_stem,
                            pos_init_std=self.pos_init_std, **kw)
    g = self.image_size // self.patch_size
    self.decoder = MaeDecoder(g * g, self.patch_size * self.patch_size * 3, self.decoder_width,
                              self.decoder_depth, self.decoder_heads, self.mlp_ratio, **kw)

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  def __call__(self, images: jax.Array, keep: jax.Array) -> dict:
    encoded = self.encoder(images, keep=keep)
    return {"pred": self.decoder(encoded, keep)}

  def tokens(self, images: jax.Array) -> jax.Array:
    return self.encoder(images)[:, 1:].astype(jnp.float32)
