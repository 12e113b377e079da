"""VQ-KD tokenizer (upstream §3.5): ViT encoder -> task layer -> cosine codebook -> feature decoder.

The feature decoder (one ViT block by default) maps the quantized codes back to the teacher's width;
training minimises 1 - cos(decoded, teacher patch tokens) plus the normalised commitment loss.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqkd_jax.nn.vit import ViTBlock, ViTEncoder, dense, layer_norm
from vqkd_jax.quantizers import CosineCodebook

Dtype = Any


class TaskLayer(nn.Module):
  """Dense(hidden) - Tanh - Dense(out), BEiT v2's task layer."""
  hidden: int
  out: int
  out_names: tuple[str, str] = ("mlp", "code")
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(dense(self.hidden, ("embed", "mlp"), "fc1", dtype=self.dtype)(x))
    return dense(self.out, self.out_names, "fc2", dtype=self.dtype)(x)


class VQKDTokenizer(nn.Module):
  """Images in [-1, 1] [B, H, W, 3] -> codes on an (H/p) x (W/p) grid -> teacher-width features.

  Attributes: encoder (image_size, patch_size, width, depth, num_heads, conv_stem), codebook
  (num_codes, code_dim, decay), feature decoder (decoder_width, decoder_depth, decoder_heads,
  teacher_dim), dtype, axis_name (pmap axis for codebook statistics).
  """
  image_size: int
  patch_size: int
  width: int
  depth: int
  num_heads: int
  num_codes: int
  code_dim: int
  decoder_width: int
  decoder_depth: int
  decoder_heads: int
  teacher_dim: int
  conv_stem: bool = False
  decay: float = 0.99
  dtype: Dtype = jnp.float32
  axis_name: Any = None

  def setup(self):
    self.encoder = ViTEncoder(self.image_size, self.patch_size, self.width, self.depth,
                              self.num_heads, conv_stem=self.conv_stem, dtype=self.dtype)
    self.encoder_norm = layer_norm("encoder_norm", self.dtype)
    self.encode_task_layer = TaskLayer(self.width, self.code_dim, dtype=self.dtype)
    self.codebook = CosineCodebook(self.num_codes, self.code_dim, self.decay,
                                   axis_name=self.axis_name)
    self.decoder_embed = dense(self.decoder_width, ("code", "embed"), dtype=self.dtype)
    g = self.image_size // self.patch_size
    self.decoder_pos = self.param("decoder_pos_embed", nn.with_logical_partitioning(
        nn.initializers.truncated_normal(0.02), (None, None, "embed")),
        (1, 1 + g * g, self.decoder_width))
    self.decoder_cls = self.param("decoder_cls_token", nn.with_logical_partitioning(
        nn.initializers.truncated_normal(0.02), (None, None, "embed")), (1, 1, self.decoder_width))
    self.decoder_blocks = [ViTBlock(self.decoder_heads, layer_index=i, dtype=self.dtype)
                           for i in range(self.decoder_depth)]
    self.decoder_norm = layer_norm("decoder_norm", self.dtype)
    self.decode_task_layer = TaskLayer(self.decoder_width, self.teacher_dim,
                                       out_names=("mlp", "embed"), dtype=self.dtype)

  def features(self, images):
    """Pre-quantizer features [B, h, w, code_dim] (float32)."""
    tokens = self.encoder(images)[:, 1:]
    b, n, _ = tokens.shape
    h = w = int(round(n ** 0.5))
    x = self.encode_task_layer(self.encoder_norm(tokens))
    return x.astype(jnp.float32).reshape(b, h, w, self.code_dim)

  def decode_features(self, z):
    """Code vectors [B, h, w, code_dim] -> predicted teacher tokens [B, h*w, teacher_dim]."""
    b, h, w, _ = z.shape
    x = self.decoder_embed(z.reshape(b, h * w, -1).astype(self.dtype))
    x = jnp.concatenate([jnp.broadcast_to(self.decoder_cls.astype(x.dtype), (b, 1, x.shape[-1])),
                         x], axis=1) + self.decoder_pos.astype(x.dtype)
    for block in self.decoder_blocks:
      x = block(x)
    return self.decode_task_layer(self.decoder_norm(x[:, 1:])).astype(jnp.float32)

  def __call__(self, images, train: bool = False) -> dict:
    """-> {"features_pred" [B, N, teacher_dim], "indices" [B, h, w], "quantized" [B, h, w, D],
    "commitment_loss", "usage_counts" [K]}."""
    q = self.codebook(self.features(images), train=train)
    return {"features_pred": self.decode_features(q["quantized"]), "indices": q["indices"],
            "quantized": q["quantized"], "commitment_loss": q["commitment_loss"],
            "usage_counts": q["usage_counts"]}

  def encode(self, images):
    """Code indices [B, h, w] (the codebook is not updated)."""
    return self.codebook(self.features(images), train=False)["indices"]

  def lookup(self, indices):
    """Unit-norm code vectors [B, h, w, code_dim] of indices [B, h, w]."""
    return self.codebook.lookup(indices)


def cosine_distillation_loss(pred: jax.Array, target: jax.Array) -> jax.Array:
  """mean over tokens of 1 - cos(pred, target); pred, target [B, N, C]."""
  pred = pred.astype(jnp.float32)
  target = target.astype(jnp.float32)
  cos = jnp.sum(pred * target, -1) / jnp.maximum(
      jnp.linalg.norm(pred, axis=-1) * jnp.linalg.norm(target, axis=-1), 1e-8)
  return jnp.mean(1.0 - cos)
