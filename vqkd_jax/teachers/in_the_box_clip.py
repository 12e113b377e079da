"""The in-the-box CLIP-style teacher: an image-text contrastive model on the built-in captions.

Image tower: a ViT (in_the_box_encoder.PatchViT, convolutional stem) whose CLS token, after the
final LayerNorm and a linear projection, is the image embedding. Text tower: a small causal
transformer over caption ids (teachers/in_the_box_captions.py) read at the <eos> token, then a
projection, as CLIP (Radford et al. 2021). Trained with the symmetric InfoNCE loss
`contrastive_loss` and a learned temperature (logit_scale = log(1 / temperature), CLIP's init 1 /
0.07, clipped at 100).

Teacher tokens (as upstream uses CLIP's): the image tower's patch tokens after the final LayerNorm
and the projection, CLS dropped (`ContrastiveImageText.patch_tokens`). The captions say where the
object is, so the image tower has to keep places apart.

The text tower is reusable (a text-to-image stage): `encode_text(token_ids)` with `tokenize` (below,
from in_the_box_captions) and train/teacher_clip.load_clip(workdir).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from vqkd_jax.nn.attention import MultiHeadAttention, dense_init
from vqkd_jax.nn.vit import Mlp, dense, depth_scaled_std, layer_norm
from vqkd_jax.teachers.in_the_box_captions import (CONTEXT_LENGTH, EOS_ID, VOCAB_SIZE,  # noqa: F401
                                                   tokenize)
from vqkd_jax.teachers.in_the_box_encoder import PatchViT

Dtype = Any
MAX_LOGIT_SCALE = math.log(100.0)


class CausalTextBlock(nn.Module):
  """Pre-LN transformer block with causal self-attention: [B, L, D] -> [B, L, D]."""
  num_heads: int
  mlp_ratio: float = 4.0
  layer_index: int = 0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    std = depth_scaled_std(self.layer_index)
    h = layer_norm("norm1", self.dtype, param_dtype=self.param_dtype)(x)
    x = x + MultiHeadAttention(self.num_heads, causal=True, out_init_std=std, dtype=self.dtype,
                               implementation="xla", name="attn")(h)
    h = layer_norm("norm2", self.dtype, param_dtype=self.param_dtype)(x)
    return x + Mlp(int(x.shape[-1] * self.mlp_ratio), out_init_std=std, dtype=self.dtype,
                   param_dtype=self.param_dtype, name="mlp")(h)


class TextTransformer(nn.Module):
  """Caption ids int [B, L] (words, EOS_ID, padding; L <= context_length) -> [B, width]: the
  final-LayerNorm features at each caption's first EOS_ID (causal attention: it has read the whole
  caption and no padding)."""
  vocab_size: int
  context_length: int
  width: int
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, ids: jax.Array) -> jax.Array:
    length = ids.shape[1]
    if length > self.context_length:
      raise ValueError(f"{length} caption tokens, the text tower takes {self.context_length}")
    x = nn.Embed(self.vocab_size, self.width, dtype=self.dtype, param_dtype=self.param_dtype,
                 name="token_embed",
                 embedding_init=nn.with_logical_partitioning(dense_init(), ("vocab", "embed")))(ids)
    pos = self.param("pos_embed", nn.with_logical_partitioning(dense_init(0.01), (None, "embed")),
                     (self.context_length, self.width), self.param_dtype)
    x = x + pos[:length].astype(x.dtype)
    for i in range(self.depth):
      x = CausalTextBlock(self.num_heads, self.mlp_ratio, i, self.dtype, self.param_dtype,
                          name=f"block{i}")(x)
    x = layer_norm("norm", self.dtype, param_dtype=self.param_dtype)(x)
    eos = jnp.argmax(ids == EOS_ID, axis=1)
    return jnp.take_along_axis(x, eos[:, None, None], axis=1)[:, 0]


class ContrastiveImageText(nn.Module):
  """CLIP-style model. Images in [-1, 1] [B, H, W, 3] (H = W = image_size); caption ids int [B, L].

  __call__(images, ids) -> {"image_embed" [B, E], "text_embed" [B, E] (both unnormalised, float32),
    "logit_scale" (scalar, clipped at log 100)}.
  encode_image(images) -> [B, E]; encode_text(ids) -> [B, E] (unnormalised, as CLIP's).
  patch_tokens(images) -> [B, N, E] float32: teacher tokens (final norm + projection, CLS dropped).
  """
  image_size: int
  patch_size: int
  width: int
  depth: int
  num_heads: int
  embed_dim: int
  text_width: int = 64
  text_depth: int = 2
  text_heads: int = 4
  vocab_size: int = VOCAB_SIZE
  context_length: int = CONTEXT_LENGTH
  conv_stem: bool = True
  init_temperature: float = 0.07
  pos_init_std: float = 0.02
  mlp_ratio: float = 4.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.visual = PatchViT(self.image_size, self.patch_size, self.width, self.depth,
                           self.num_heads, self.mlp_ratio, self.conv_stem,
                           pos_init_std=self.pos_init_std, **kw)
    self.visual_proj = dense(self.embed_dim, ("embed", "mlp"), use_bias=False,
                             std=self.width ** -0.5, **kw)
    self.text = TextTransformer(self.vocab_size, self.context_length, self.text_width,
                                self.text_depth, self.text_heads, self.mlp_ratio, **kw)
    self.text_proj = dense(self.embed_dim, ("embed", "mlp"), use_bias=False,
                           std=self.text_width ** -0.5, **kw)
    self.logit_scale = self.param(
        "logit_scale", nn.with_logical_partitioning(
            nn.initializers.constant(math.log(1.0 / self.init_temperature)), ()), ())

  def _visual_tokens(self, images: jax.Array) -> jax.Array:
    return self.visual_proj(self.visual(images)).astype(jnp.float32)  # [B, 1 + N, E]

  def encode_image(self, images: jax.Array) -> jax.Array:
    return self._visual_tokens(images)[:, 0]

  def patch_tokens(self, images: jax.Array) -> jax.Array:
    return self._visual_tokens(images)[:, 1:]

  def encode_text(self, ids: jax.Array) -> jax.Array:
    return self.text_proj(self.text(ids)).astype(jnp.float32)

  def __call__(self, images: jax.Array, ids: jax.Array) -> dict:
    return {"image_embed": self.encode_image(images), "text_embed": self.encode_text(ids),
            "logit_scale": jnp.minimum(self.logit_scale, MAX_LOGIT_SCALE)}


def contrastive_loss(image_embed: jax.Array, text_embed: jax.Array, logit_scale: jax.Array,
                     positives: jax.Array | None = None) -> tuple[jax.Array, dict]:
  """Symmetric InfoNCE of CLIP: logits = exp(logit_scale) * cos(image_i, text_j), [B, T]; the mean
  of the image->text cross-entropy (over the rows) and the text->image one (over the columns that
  have a positive).

  image_embed [B, E]; text_embed [T, E] (T = B: the batch's own captions; or a bank of captions).
  positives: bool [B, T]: the pairs that match, each row's (column's) target spread evenly over its
    positives (identical captions of different images); None = the diagonal (T = B).
  Returns (loss, {"image_to_text_accuracy": fraction of rows whose best text is a positive})."""
  i = image_embed.astype(jnp.float32)
  t = text_embed.astype(jnp.float32)
  i = i / jnp.maximum(jnp.linalg.norm(i, axis=-1, keepdims=True), 1e-12)
  t = t / jnp.maximum(jnp.linalg.norm(t, axis=-1, keepdims=True), 1e-12)
  logits = jnp.exp(logit_scale) * i @ t.T
  if positives is None:
    positives = jnp.eye(logits.shape[0], dtype=bool)
  p = positives.astype(jnp.float32)
  row_count, col_count = jnp.sum(p, axis=1), jnp.sum(p, axis=0)
  image_to_text = optax.softmax_cross_entropy(logits, p / jnp.maximum(row_count, 1)[:, None])
  image_to_text = jnp.mean(image_to_text)
  text_to_image = optax.softmax_cross_entropy(logits.T, p.T / jnp.maximum(col_count, 1)[:, None])
  has_image = (col_count > 0).astype(jnp.float32)
  text_to_image = jnp.sum(text_to_image * has_image) / jnp.maximum(jnp.sum(has_image), 1.0)
  best = jnp.argmax(logits, axis=1)
  accuracy = jnp.mean(jnp.take_along_axis(positives, best[:, None], axis=1))
  return 0.5 * (image_to_text + text_to_image), {"image_to_text_accuracy": accuracy}


def same_caption(ids: jax.Array) -> jax.Array:
  """bool [B, B]: whether captions i and j have the same ids [B, L]."""
  return jnp.all(ids[:, None, :] == ids[None, :, :], axis=-1)
