"""Vision Transformer pieces: MLP, pre-LN block, patch embedding (plain or convolutional stem),
the encoder, and torch-compatible position-embedding interpolation."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqkd_jax.nn.attention import MultiHeadAttention, dense_init

Dtype = Any


def layer_norm(name: str | None = None, dtype: Dtype = jnp.float32, eps: float = 1e-6):
  return nn.LayerNorm(epsilon=eps, dtype=dtype, name=name,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)))


def dense(features: int, names: tuple[str, str], name: str | None = None, std: float = 0.02,
          dtype: Dtype = jnp.float32, use_bias: bool = True):
  return nn.Dense(features, dtype=dtype, name=name, use_bias=use_bias,
                  kernel_init=nn.with_logical_partitioning(dense_init(std), names),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, names[1:]))


class Mlp(nn.Module):
  """Dense(hidden) - GELU (exact) - Dense(out): [..., D] -> [..., D]."""
  hidden: int
  out_init_std: float = 0.02
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    h = dense(self.hidden, ("embed", "mlp"), "fc1", dtype=self.dtype)(x)
    h = nn.gelu(h, approximate=False)
    return dense(d, ("mlp", "embed"), "fc2", std=self.out_init_std, dtype=self.dtype)(h)


class ViTBlock(nn.Module):
  """Pre-LN transformer block: x + Attn(LN(x)); x + MLP(LN(x)). [B, L, D] -> [B, L, D].

  `layer_index` (0-based) scales the init of the attention output and fc2 by 1/sqrt(2(i+1)) (BEiT).
  """
  num_heads: int
  mlp_ratio: float = 4.0
  layer_index: int | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    std = 0.02 if self.layer_index is None else 0.02 / (2.0 * (self.layer_index + 1)) ** 0.5
    h = layer_norm("norm1", self.dtype)(x)
    x = x + MultiHeadAttention(self.num_heads, out_init_std=std, dtype=self.dtype, name="attn")(h)
    h = layer_norm("norm2", self.dtype)(x)
    return x + Mlp(int(x.shape[-1] * self.mlp_ratio), out_init_std=std, dtype=self.dtype,
                   name="mlp")(h)


class PatchEmbed(nn.Module):
  """Images [B, H, W, C] -> patch tokens [B, H/p, W/p, D].

  conv_stem=False: one p x p conv with stride p (ViT). conv_stem=True: 3x3 convs with GELU, each of
  stride 2 until the stride reaches p, then a 1x1 projection (a small convolutional stem, which trains
  much faster on small data)."""
  patch_size: int
  width: int
  conv_stem: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = lambda f, k, s, name: nn.Conv(
        f, (k, k), (s, s), padding="SAME" if k > s else "VALID", dtype=self.dtype, name=name,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                 ("patch", "patch", "conv_in", "conv_out")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)))
    if not self.conv_stem:
      return conv(self.width, self.patch_size, self.patch_size, "proj")(x)
    stride, i = 1, 0
    channels = max(self.width // 4, 16)
    while stride < self.patch_size:
      x = nn.gelu(conv(channels, 3, 2, f"stem{i}")(x), approximate=False)
      stride, i, channels = stride * 2, i + 1, min(channels * 2, self.width)
    return conv(self.width, 1, 1, "proj")(x)


class ViTEncoder(nn.Module):
  """ViT over images in [-1, 1]: [B, H, W, 3] -> tokens [B, (1+) N, D] (CLS first when cls_token).

  Learned absolute position embeddings (trunc. normal 0.02) for the CLS token and a grid of
  image_size/patch_size patches; other image sizes interpolate the grid (torch-compatible bicubic).
  """
  image_size: int
  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  cls_token: bool = True
  conv_stem: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images):
    x = PatchEmbed(self.patch_size, self.width, self.conv_stem, self.dtype, name="patch_embed")(
        images.astype(self.dtype))
    b, gh, gw, d = x.shape
    x = x.reshape(b, gh * gw, d)
    g = self.image_size // self.patch_size
    n_cls = int(self.cls_token)
    pos = self.param("pos_embed", nn.with_logical_partitioning(
        nn.initializers.truncated_normal(0.02), (None, None, "embed")), (1, n_cls + g * g, d))
    pos = pos.astype(jnp.float32)
    patch_pos = pos[:, n_cls:]
    if (gh, gw) != (g, g):
      patch_pos = interpolate_pos_embed(patch_pos, (g, g), (gh, gw))
    x = x + patch_pos.astype(x.dtype)
    if self.cls_token:
      cls = self.param("cls_token", nn.with_logical_partitioning(
          nn.initializers.truncated_normal(0.02), (None, None, "embed")), (1, 1, d))
      x = jnp.concatenate([jnp.broadcast_to((cls + pos[:, :1]).astype(x.dtype), (b, 1, d)), x], 1)
    for i in range(self.depth):
      x = ViTBlock(self.num_heads, self.mlp_ratio, layer_index=i, dtype=self.dtype,
                   name=f"block{i}")(x)
    return x


def _cubic_weights(t: jax.Array, a: float = -0.75) -> jax.Array:
  """Keys cubic convolution weights for the 4 taps at offsets -1, 0, 1, 2 (torch uses a=-0.75)."""
  def w(x):
    x = jnp.abs(x)
    return jnp.where(x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                     jnp.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))
  return jnp.stack([w(t + 1), w(t), w(1 - t), w(2 - t)], axis=-1)


def _resize_matrix(in_size: int, out_size: int, scale: float | None = None) -> jax.Array:
  """[out, in] matrix of torch bicubic interpolation (align_corners=False, border clamped)."""
  ratio = (1.0 / scale) if scale is not None else in_size / out_size
  src = (jnp.arange(out_size) + 0.5) * ratio - 0.5
  i0 = jnp.floor(src)
  weights = _cubic_weights(src - i0)
  idx = jnp.clip(i0[:, None].astype(jnp.int32) + jnp.arange(-1, 3)[None], 0, in_size - 1)
  m = jnp.zeros((out_size, in_size))
  return m.at[jnp.arange(out_size)[:, None], idx].add(weights)


def interpolate_pos_embed(pos: jax.Array, old_grid: tuple[int, int], new_grid: tuple[int, int],
                          scale_offset: float | None = None) -> jax.Array:
  """Bicubic resize of grid position embeddings [1, gh*gw, D] -> [1, nh*nw, D], as
  torch.nn.functional.interpolate(mode="bicubic", align_corners=False). With `scale_offset` (DINO's
  0.1 trick, used upstream) the scale factor is (new + offset) / old."""
  gh, gw = old_grid
  nh, nw = new_grid
  grid = pos.reshape(gh, gw, -1)
  sh = None if scale_offset is None else (nh + scale_offset) / gh
  sw = None if scale_offset is None else (nw + scale_offset) / gw
  mh, mw = _resize_matrix(gh, nh, sh), _resize_matrix(gw, nw, sw)
  out = jnp.einsum("ih,jw,hwd->ijd", mh, mw, grid, precision=jax.lax.Precision.HIGHEST)
  return out.reshape(1, nh * nw, -1)
