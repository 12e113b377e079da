"""The in-the-box DINO-style teacher: self-distillation with an EMA teacher, plus iBOT's patch term.

One network (in_the_box_encoder.PatchViT with a mask token, convolutional stem, and a DINO head:
MLP -> L2-normalised bottleneck -> weight-normalised prototypes) plays both roles: the student
(trained by gradient) and the teacher (an exponential moving average of the student, kept in the
stage's model_state). The student matches, with a cross-entropy, the teacher's centred and sharpened
distribution over `num_prototypes` (`teacher_distribution`, `update_center`, `ema_update`):
  DINO term: the CLS output of one random view against the teacher's CLS output of the other view
    (two global views of each image, Caron et al. 2021).
  iBOT term: the patch outputs at hidden positions of the student's masked view against the
    teacher's patch outputs of the same view unmasked (Zhou et al. 2022).
The iBOT term is there to keep spatial meaning: the DINO term trains only the CLS output, and
nothing then asks the patch tokens to differ; predicting a hidden patch's teacher distribution asks
each token to describe its own place.

Teacher tokens (as upstream's DINO teacher): the EMA teacher's backbone on the whole image, last
layer after the final LayerNorm, CLS dropped (`DinoViT.tokens`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqkd_jax.nn import activations
from vqkd_jax.nn.vit import dense
from vqkd_jax.teachers.in_the_box_encoder import PatchViT

Dtype = Any


class DinoHead(nn.Module):
  """[..., D] -> [..., num_prototypes]: Dense-GELU-Dense-GELU-Dense(bottleneck), L2 normalisation,
  then a bias-free linear layer whose columns are normalised to unit length (DINO's weight-normed
  last layer with the norm fixed at 1): the logits are cosines with the prototypes."""
  num_prototypes: int
  hidden: int = 256
  bottleneck: int = 64
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = activations.gelu(dense(self.hidden, ("embed", "mlp"), "fc1", **kw)(x))
    x = activations.gelu(dense(self.hidden, ("mlp", "mlp"), "fc2", **kw)(x))
    x = dense(self.bottleneck, ("mlp", "embed"), "fc3", **kw)(x).astype(jnp.float32)
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-6)
    v = self.param("prototypes", nn.with_logical_partitioning(
        nn.initializers.truncated_normal(0.02), ("embed", "vocab")),
        (self.bottleneck, self.num_prototypes), self.param_dtype).astype(jnp.float32)
    return x @ (v / jnp.maximum(jnp.linalg.norm(v, axis=0, keepdims=True), 1e-6))


class DinoViT(nn.Module):
  """Images in [-1, 1] [B, H, W, 3] (H = W = image_size) -> dict:
    cls_logits [B, K]: the head on the CLS token; patch_logits [B, N, K]: the head on each patch
    token (float32); `mask` bool [B, N] (True = hidden) replaces those patches by the mask token.
  tokens(images) -> [B, N, width] float32: backbone patch tokens after the final LayerNorm, CLS
    dropped, no masking (the teacher tokens, from the EMA teacher's parameters)."""
  image_size: int
  patch_size: int
  width: int
  depth: int
  num_heads: int
  num_prototypes: int = 256
  head_hidden: int = 256
  head_bottleneck: int = 64
  conv_stem: bool = True
  pos_init_std: float = 0.02
  mlp_ratio: float = 4.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.backbone = PatchViT(self.image_size, self.patch_size, self.width, self.depth,
                             self.num_heads, self.mlp_ratio, self.conv_stem, use_mask_token=True,
                             pos_init_std=self.pos_init_std, **kw)
    self.head = DinoHead(self.num_prototypes, self.head_hidden, self.head_bottleneck, **kw)

  def __call__(self, images: jax.Array, mask: jax.Array | None = None) -> dict:
    logits = self.head(self.backbone(images, mask=mask))
    return {"cls_logits": logits[:, 0], "patch_logits": logits[:, 1:]}

  def tokens(self, images: jax.Array) -> jax.Array:
    return self.backbone(images)[:, 1:].astype(jnp.float32)


def teacher_distribution(logits: jax.Array, center: jax.Array, temperature: float) -> jax.Array:
  """Centring and sharpening: softmax((logits - center) / temperature) over the last axis."""
  return jax.nn.softmax((logits.astype(jnp.float32) - center) / temperature, axis=-1)


def update_center(center: jax.Array, logits: jax.Array, momentum: float,
                  axis_name: str | None = None) -> jax.Array:
  """center [K] <- momentum * center + (1 - momentum) * mean of logits [..., K] over all leading
  axes (and over devices under pmap's `axis_name`)."""
  mean = jnp.mean(logits.astype(jnp.float32).reshape(-1, logits.shape[-1]), axis=0)
  if axis_name:
    mean = jax.lax.pmean(mean, axis_name)
  return momentum * center + (1.0 - momentum) * mean


def ema_update(teacher, student, momentum: jax.Array | float):
  """Every teacher leaf <- momentum * teacher + (1 - momentum) * student (same tree structure)."""
  return jax.tree.map(lambda t, s: momentum * t + (1.0 - momentum) * s.astype(t.dtype),
                      teacher, student)


def ema_momentum(update: jax.Array, total: int, base: float) -> jax.Array:
  """DINO's cosine schedule of the teacher momentum: base at update 0, 1 at update `total`."""
  progress = jnp.clip(update / max(total, 1), 0.0, 1.0)
  return 1.0 - (1.0 - base) * (jnp.cos(jnp.pi * progress) + 1.0) / 2.0


def cross_entropy(teacher_probs: jax.Array, student_logits: jax.Array,
                  temperature: float) -> jax.Array:
  """-sum_k p_k log softmax(student_logits / temperature)_k over the last axis: [..., K] -> [...].
  """
  log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  return -jnp.sum(teacher_probs * log_q, axis=-1)
