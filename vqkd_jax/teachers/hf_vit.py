"""The Vision Transformer of Hugging Face's image-understanding checkpoints, one module for every
family (CLIP vision tower, ViT / DINO, MAE encoder, DINOv2 with or without registers, SigLIP vision
tower): they differ only in switches (patch bias, class token, registers, pre-norm, layer scale, MLP
activation, LayerNorm eps, output projection, how position embeddings are resized).

The module returns what VQ-KD distils: last-layer patch tokens after the final norm (class and
register tokens dropped), then the output projection if any. Images are NHWC and already normalised;
`preprocess` does that from uint8 with a teacher's mean/std.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vqkd_jax.nn import activations
from vqkd_jax.nn.attention import MultiHeadAttention
from vqkd_jax.nn.vit import (PatchConv, bicubic_resize_matrix, dense, layer_norm,
                             torch_default_init)

Dtype = Any

ACTIVATIONS = ("gelu", "quick_gelu", "gelu_tanh")


def activation_fn(name: str):
  """"gelu" (exact erf), "quick_gelu" (x sigmoid(1.702 x), OpenAI CLIP), "gelu_tanh" (tanh approx.)."""
  if name == "gelu":
    return activations.gelu
  if name == "quick_gelu":
    return lambda x: x * nn.sigmoid(1.702 * x)
  if name == "gelu_tanh":
    return functools.partial(nn.gelu, approximate=True)
  raise ValueError(f"activation {name!r}: one of {ACTIVATIONS}")


class FeedForward(nn.Module):
  """fc1 - activation - fc2: [..., D] -> [..., D]."""
  hidden: int
  activation: str = "gelu"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = dense(self.hidden, ("embed", "mlp"), "fc1", **kw)(x)
    h = activation_fn(self.activation)(h)
    return dense(x.shape[-1], ("mlp", "embed"), "fc2", **kw)(h)


class Block(nn.Module):
  """Pre-LN block: x + s1 * Attn(LN(x)), then x + s2 * MLP(LN(x)); [B, L, D] -> [B, L, D].

  s1, s2: DINOv2's per-channel layer scales (`layer_scale`), else 1. Attention parameters are float32
  whatever `param_dtype` (MultiHeadAttention has none). `frozen` as `nn.vit.ViTBlock`'s."""
  num_heads: int
  mlp_dim: int
  activation: str = "gelu"
  layer_norm_eps: float = 1e-6
  layer_scale: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  frozen: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    d = x.shape[-1]

    def scaled(h, name):
      if not self.layer_scale:
        return h
      s = self.param(name, nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (d,),
                     self.param_dtype)
      return h * s.astype(h.dtype)

    h = layer_norm("norm1", eps=self.layer_norm_eps, **kw)(x)
    x = x + scaled(MultiHeadAttention(self.num_heads, dtype=self.dtype, name="attn")(
        h, differentiable=not self.frozen), "scale1")
    h = layer_norm("norm2", eps=self.layer_norm_eps, **kw)(x)
    h = FeedForward(self.mlp_dim, self.activation, name="mlp", **kw)(h)
    return x + scaled(h, "scale2")


class VisionTransformer(nn.Module):
  """Normalised images [B, H, W, 3] -> last-layer patch tokens [B, (H/p)(W/p), C] (compute dtype).

  Attributes:
    patch_size, width, depth, num_heads, mlp_dim: the ViT's sizes.
    grid: side of the checkpoint's square grid of position embeddings (its image_size / patch_size).
      Other grids get the patch positions resized bicubically, as torch's F.interpolate(
      mode="bicubic", align_corners=False) with an output size (and `antialias=pos_antialias`).
    activation: MLP activation ("gelu", "quick_gelu", "gelu_tanh").
    layer_norm_eps: eps of every LayerNorm.
    patch_bias: bias of the patch-embedding conv (CLIP has none).
    class_token: a learned class token first (SigLIP has none); its position is `pos_embed[:, :1]`.
    num_registers: DINOv2's register tokens, inserted after the class token, without positions.
    pre_norm: a LayerNorm on the embeddings before the blocks (CLIP's pre_layrnorm).
    layer_scale: DINOv2's per-channel residual scales.
    proj_dim: a bias-free output projection to proj_dim (CLIP's visual_projection); 0: none, C = width.
    pos_antialias: DINOv2-with-registers resizes its positions with antialiasing.
    frozen: no gradient is ever taken through the model (the default: a teacher), so cuDNN's
      attention runs at the true sequence length, without the pads its backward needs.
  """
  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  grid: int
  activation: str = "gelu"
  layer_norm_eps: float = 1e-6
  patch_bias: bool = True
  class_token: bool = True
  num_registers: int = 0
  pre_norm: bool = False
  layer_scale: bool = False
  proj_dim: int = 0
  pos_antialias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  frozen: bool = True

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    d, p = self.width, self.patch_size
    x = PatchConv(d, p, torch_default_init, use_bias=self.patch_bias, name="patch_embed",
                  **kw)(images.astype(self.dtype))
    b, gh, gw, _ = x.shape
    x = x.reshape(b, gh * gw, d)
    n_cls = int(self.class_token)
    trunc = nn.initializers.truncated_normal(0.02)
    pos = self.param("pos_embed", nn.with_logical_partitioning(trunc, (None, None, "embed")),
                     (1, n_cls + self.grid * self.grid, d), self.param_dtype)
    patch_pos = pos[:, n_cls:]
    if (gh, gw) != (self.grid, self.grid):
      patch_pos = resize_pos_embed(patch_pos, (self.grid, self.grid), (gh, gw), self.pos_antialias)
    x = x + patch_pos.astype(x.dtype)
    prefix = []
    if self.class_token:
      cls = self.param("cls_token", nn.with_logical_partitioning(trunc, (None, None, "embed")),
                       (1, 1, d), self.param_dtype)
      prefix.append(cls + pos[:, :1])
    if self.num_registers:
      prefix.append(self.param("registers", nn.with_logical_partitioning(
          trunc, (None, None, "embed")), (1, self.num_registers, d), self.param_dtype))
    if prefix:
      prefix = jnp.concatenate(prefix, axis=1).astype(x.dtype)
      x = jnp.concatenate([jnp.broadcast_to(prefix, (b, *prefix.shape[1:])), x], axis=1)
    if self.pre_norm:
      x = layer_norm("pre_norm", eps=self.layer_norm_eps, **kw)(x)
    for i in range(self.depth):
      x = Block(self.num_heads, self.mlp_dim, self.activation, self.layer_norm_eps,
                self.layer_scale, frozen=self.frozen, name=f"block{i}", **kw)(x)
    x = x[:, n_cls + self.num_registers:]
    x = layer_norm("norm", eps=self.layer_norm_eps, **kw)(x)
    if self.proj_dim:
      x = dense(self.proj_dim, ("embed", "mlp"), "proj", use_bias=False, **kw)(x)
    return x


# ---------------------------------------------------------------------------------------------------
# Resizing as matrices: position embeddings and images


def antialiased_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] matrix of torch's F.interpolate(mode="bicubic", align_corners=False, antialias=True)
  with an output size (PIL's filter: Keys a = -0.5, support 2 scaled by the downsampling factor,
  weights renormalised at the borders)."""
  def cubic(x, a=-0.5):
    x = abs(x)
    if x < 1:
      return ((a + 2) * x - (a + 3)) * x * x + 1
    return (((x - 5) * x + 8) * x - 4) * a if x < 2 else 0.0

  scale = in_size / out_size
  support = 2.0 * scale if scale >= 1.0 else 2.0
  inv = 1.0 / scale if scale >= 1.0 else 1.0
  m = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    center = scale * (i + 0.5)
    lo = max(int(center - support + 0.5), 0)
    hi = min(int(center + support + 0.5), in_size)
    w = np.array([cubic((j - center + 0.5) * inv) for j in range(lo, hi)])
    if w.sum() != 0:
      w = w / w.sum()
    m[i, lo:hi] = w
  return m.astype(np.float32)


def resize_matrix(in_size: int, out_size: int, antialias: bool = False) -> jax.Array:
  """torch bicubic (align_corners=False, output size) as an [out, in] matrix."""
  if antialias:
    return jnp.asarray(antialiased_bicubic_matrix(in_size, out_size))
  return bicubic_resize_matrix(in_size, out_size)


def resize_pos_embed(pos: jax.Array, old_grid: tuple[int, int], new_grid: tuple[int, int],
                     antialias: bool = False) -> jax.Array:
  """Grid position embeddings [..., gh*gw, D] -> [..., nh*nw, D], bicubic in float32."""
  (gh, gw), (nh, nw) = old_grid, new_grid
  grid = pos.reshape(*pos.shape[:-2], gh, gw, pos.shape[-1]).astype(jnp.float32)
  out = jnp.einsum("ih,jw,...hwd->...ijd", resize_matrix(gh, nh, antialias),
                   resize_matrix(gw, nw, antialias), grid, precision=jax.lax.Precision.HIGHEST)
  return out.reshape(*pos.shape[:-2], nh * nw, pos.shape[-1]).astype(pos.dtype)


def preprocess(images_uint8: jax.Array, mean: Sequence[float], std: Sequence[float],
               image_size: int | None = None) -> jax.Array:
  """uint8 [B, H, W, 3] -> float32 (x - 255 mean) / (255 std) [B, S, S, 3] (mean, std in 0..1 units),
  then bicubically resized to image_size (torch F.interpolate bicubic, align_corners=False, no
  antialias, as upstream's teachers) when given and different; None keeps the input size."""
  x = images_uint8.astype(jnp.float32)
  x = (x - 255.0 * jnp.asarray(mean, jnp.float32)) / (255.0 * jnp.asarray(std, jnp.float32))
  h, w = x.shape[1:3]
  if image_size and (h, w) != (image_size, image_size):
    x = jnp.einsum("ih,jw,bhwc->bijc", bicubic_resize_matrix(h, image_size),
                   bicubic_resize_matrix(w, image_size), x, precision=jax.lax.Precision.HIGHEST)
  return x

