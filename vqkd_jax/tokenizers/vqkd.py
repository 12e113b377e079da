"""VQ-KD tokenizer (upstream §3.5): ViT encoder -> task layer -> cosine codebook -> feature decoder.

The feature decoder (one ViT block upstream) maps the quantized codes to the teacher's width; training
minimises mean(1 - cos(decoded, teacher patch tokens)) + the normalised commitment loss (weight 1).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqkd_jax.nn.vit import ViTBlock, ViTEncoder, dense, interpolate_pos_embed, layer_norm
from vqkd_jax.quantizers import CosineCodebook

Dtype = Any


class TaskLayer(nn.Module):
  """Dense(hidden) - Tanh - Dense(out) (BEiT v2's task layer): [..., C] -> [..., out]."""
  hidden: int
  out: int
  out_names: tuple[str, str] = ("mlp", "code")
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = jnp.tanh(dense(self.hidden, ("embed", "mlp"), "fc1", **kw)(x))
    return dense(self.out, self.out_names, "fc2", **kw)(x)


class VQKDTokenizer(nn.Module):
  """Images in [-1, 1] [B, H, W, 3] -> codes on an (H/p) x (W/p) grid -> teacher-width features.

  Encoder: ViT (patch_size, width, depth, num_heads; conv_stem optional) without its CLS output ->
  fc_norm LayerNorm -> task layer Dense(width)-Tanh-Dense(code_dim). Quantizer: CosineCodebook
  (num_codes, code_dim, decay, kmeans_iters, restart_below / restart_decay: the dead-code restart,
  off by default; axis_name for pmap). Feature decoder: Dense code_dim ->
  decoder_width (the 1x1 patch embedding), CLS + learned positions, decoder_depth ViT blocks
  (decoder_heads), fc_norm, Dense(decoder_width)-Tanh-Dense(teacher_dim).

  approximate_gelu: the tanh GELU (big_vision's choice, faster on GPUs) instead of upstream's exact.
  Position embeddings are made for image_size; other sizes interpolate them bicubically with the
  scale (n + pos_interp_offset) / g, as upstream uses the 224-trained tokenizer at 256.
  Variables: "params" and "codebook" (pass rngs {"params", "codebook"} to init; mutable=["codebook"]
  and rngs={"codebook": key} to a training apply).
  """
  image_size: int
  patch_size: int
  width: int
  depth: int
  num_heads: int
  num_codes: int
  code_dim: int
  decoder_width: int
  decoder_depth: int = 1
  decoder_heads: int = 12
  teacher_dim: int = 768
  conv_stem: bool = False
  mlp_ratio: float = 4.0
  decay: float = 0.99
  kmeans_iters: int = 10
  restart_below: float = 0.0
  restart_decay: float = 0.9
  pos_interp_offset: float | None = 0.1
  approximate_gelu: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  axis_name: Any = None

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.encoder = ViTEncoder(self.patch_size, self.width, self.depth, self.num_heads,
                              mlp_ratio=self.mlp_ratio, cls_token=True, conv_stem=self.conv_stem,
                              image_size=self.image_size, pos_interp_offset=self.pos_interp_offset,
                              approximate_gelu=self.approximate_gelu, **kw)
    self.encoder_norm = layer_norm("encoder_norm", **kw)
    self.encode_task_layer = TaskLayer(self.width, self.code_dim, ("mlp", "code"), **kw)
    self.codebook = CosineCodebook(self.num_codes, self.code_dim, self.decay, self.kmeans_iters,
                                   axis_name=self.axis_name, restart_below=self.restart_below,
                                   restart_decay=self.restart_decay)
    self.decoder_embed = dense(self.decoder_width, ("code", "embed"), **kw)
    g = self.image_size // self.patch_size
    init = nn.initializers.truncated_normal(0.02)
    self.decoder_pos = self.param(
        "decoder_pos_embed", nn.with_logical_partitioning(init, (None, None, "embed")),
        (1, 1 + g * g, self.decoder_width), self.param_dtype)
    self.decoder_cls = self.param(
        "decoder_cls_token", nn.with_logical_partitioning(init, (None, None, "embed")),
        (1, 1, self.decoder_width), self.param_dtype)
    self.decoder_blocks = [ViTBlock(self.decoder_heads, self.mlp_ratio, layer_index=i,
                                    approximate_gelu=self.approximate_gelu, **kw)
                           for i in range(self.decoder_depth)]
    self.decoder_norm = layer_norm("decoder_norm", **kw)
    self.decode_task_layer = TaskLayer(self.decoder_width, self.teacher_dim, ("mlp", "embed"), **kw)

  def features(self, images: jax.Array) -> jax.Array:
    """Pre-quantizer features [B, h, w, code_dim] (float32) of images [B, H, W, 3]."""
    b, hh, ww = images.shape[:3]
    tokens = self.encoder(images)[:, 1:]
    x = self.encode_task_layer(self.encoder_norm(tokens))
    return x.astype(jnp.float32).reshape(b, hh // self.patch_size, ww // self.patch_size,
                                         self.code_dim)

  def decode_features(self, z: jax.Array) -> jax.Array:
    """Code vectors [B, h, w, code_dim] -> predicted teacher tokens [B, h*w, teacher_dim] (float32)."""
    b, h, w, _ = z.shape
    x = self.decoder_embed(z.reshape(b, h * w, -1).astype(self.dtype))
    g = self.image_size // self.patch_size
    patch_pos = self.decoder_pos[:, 1:]
    if (h, w) != (g, g):
      patch_pos = interpolate_pos_embed(patch_pos, (h, w), (g, g), self.pos_interp_offset)
    cls = (self.decoder_cls + self.decoder_pos[:, :1]).astype(x.dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, x.shape[-1])),
                         x + patch_pos.astype(x.dtype)], axis=1)
    for block in self.decoder_blocks:
      x = block(x)
    return self.decode_task_layer(self.decoder_norm(x[:, 1:])).astype(jnp.float32)

  def __call__(self, images: jax.Array, train: bool = False) -> dict:
    """images [B, H, W, 3] -> {"features_pred" [B, N, teacher_dim], "indices" int32 [B, h, w],
    "quantized" [B, h, w, code_dim] (STE), "commitment_loss", "usage_counts" [K] (global)}.
    train=True updates the codebook (k-means init on the first call, then EMA)."""
    q = self.codebook(self.features(images), train=train)
    return {"features_pred": self.decode_features(q["quantized"]), "indices": q["indices"],
            "quantized": q["quantized"], "commitment_loss": q["commitment_loss"],
            "usage_counts": q["usage_counts"]}

  def encode(self, images: jax.Array) -> jax.Array:
    """Code indices int32 [B, h, w] of images [B, H, W, 3] (the codebook is not updated)."""
    return self.codebook(self.features(images), train=False)["indices"]

  def lookup(self, indices: jax.Array) -> jax.Array:
    """Unit-norm code vectors [B, h, w, code_dim] of indices [B, h, w]."""
    return self.codebook.lookup(indices)


def cosine_distillation_loss(pred: jax.Array, target: jax.Array, eps: float = 1e-12) -> jax.Array:
  """mean over tokens of 1 - cos(pred, target), cos = <p, t> / sqrt((|p|^2 + eps)(|t|^2 + eps))
  (F.cosine_embedding_loss with target +1, as upstream); pred, target [..., C] -> scalar."""
  pred = pred.astype(jnp.float32)
  target = target.astype(jnp.float32)
  dot = jnp.sum(pred * target, axis=-1)
  norms = jnp.sqrt((jnp.sum(pred * pred, axis=-1) + eps) * (jnp.sum(target * target, axis=-1) + eps))
  return jnp.mean(1.0 - dot / norms)
