"""Vision Transformer pieces: MLP, pre-LN block, patch embedding (plain or convolutional stem), the
encoder, and torch-compatible bicubic interpolation of position embeddings. NHWC images."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqkd_jax.nn import activations
from vqkd_jax.nn.attention import MultiHeadAttention, dense_init
from vqkd_jax.nn.layer_norm import LayerNorm

Dtype = Any

# PyTorch's default Linear/Conv init (kaiming_uniform a=sqrt(5)): U(+-1/sqrt(fan_in)).
torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def layer_norm(name: str | None = None, dtype: Dtype = jnp.float32, eps: float = 1e-6,
               param_dtype: Dtype = jnp.float32) -> LayerNorm:
  """LayerNorm (eps 1e-6, statistics in float32; flax's parameters and values, nn/layer_norm.py's
  gradient) with `norm`-named scale and bias."""
  return LayerNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name,
                   scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                   bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)))


def dense(features: int, names: tuple[str, str], name: str | None = None, std: float = 0.02,
          dtype: Dtype = jnp.float32, use_bias: bool = True,
          param_dtype: Dtype = jnp.float32) -> nn.Dense:
  """Dense with a trunc-normal(std) kernel named `names` (in, out) and a zero bias named `names[1]`."""
  return nn.Dense(features, dtype=dtype, param_dtype=param_dtype, name=name, use_bias=use_bias,
                  kernel_init=nn.with_logical_partitioning(dense_init(std), names),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, names[1:]))


def depth_scaled_std(layer_index: int | None, std: float = 0.02) -> float:
  """BEiT's init of the residual output projections of block i (0-based): std / sqrt(2 (i + 1))."""
  return std if layer_index is None else std / math.sqrt(2.0 * (layer_index + 1))


class Mlp(nn.Module):
  """Dense(hidden) - GELU - Dense(D): [..., D] -> [..., D]. GELU exact (erf, as BEiT/upstream's
  torch.nn.GELU: `nn/activations.gelu`) or, with `approximate_gelu`, the tanh form (big_vision's
  default)."""
  hidden: int
  out_init_std: float = 0.02
  approximate_gelu: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    h = dense(self.hidden, ("embed", "mlp"), "fc1", dtype=self.dtype,
              param_dtype=self.param_dtype)(x)
    h = nn.gelu(h, approximate=True) if self.approximate_gelu else activations.gelu(h)
    return dense(d, ("mlp", "embed"), "fc2", std=self.out_init_std, dtype=self.dtype,
                 param_dtype=self.param_dtype)(h)


class ViTBlock(nn.Module):
  """Pre-LN transformer block: x + Attn(LN(x)), then x + MLP(LN(x)). [B, L, D] -> [B, L, D].

  LayerNorm eps 1e-6, exact GELU, MLP width mlp_ratio * D. `layer_index` (0-based) set: the attention
  output and fc2 kernels start at std 0.02 / sqrt(2 (i + 1)) (BEiT); None: 0.02. The attention's own
  parameters are float32 whatever `param_dtype` (MultiHeadAttention has no param_dtype). `frozen`:
  no gradient is ever taken through the block (a frozen teacher), so cuDNN's attention runs at the
  true sequence length, without the pads its backward needs (`dot_product_attention`).
  """
  num_heads: int
  mlp_ratio: float = 4.0
  layer_index: int | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  approximate_gelu: bool = False
  frozen: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    std = depth_scaled_std(self.layer_index)
    h = layer_norm("norm1", self.dtype, param_dtype=self.param_dtype)(x)
    x = x + MultiHeadAttention(self.num_heads, out_init_std=std, dtype=self.dtype, name="attn")(
        h, differentiable=not self.frozen)
    h = layer_norm("norm2", self.dtype, param_dtype=self.param_dtype)(x)
    return x + Mlp(int(x.shape[-1] * self.mlp_ratio), out_init_std=std,
                   approximate_gelu=self.approximate_gelu, dtype=self.dtype,
                   param_dtype=self.param_dtype, name="mlp")(h)


def conv_stem_strides(patch_size: int) -> int:
  """Number of stride-2 3x3 convs of the convolutional stem for a power-of-two patch size."""
  n = int(round(math.log2(patch_size)))
  if 2 ** n != patch_size or n < 1:
    raise ValueError(f"conv_stem needs a power-of-two patch size >= 2, got {patch_size}")
  return n


class PatchConv(nn.Module):
  """A p x p convolution of stride p (VALID) computed as one matmul over flattened patches, with
  nn.Conv's parameters (kernel [p, p, C, D] named patch, patch, conv_in, conv_out; bias [D]).
  XLA:GPU ran the strided convolution as an implicit GEMM at 1.7 ms per ViT-B/16 forward at batch
  256 on an H100; the matmul takes about 0.1 ms. `use_bias` False: no bias (CLIP's patch embedding)."""
  features: int
  patch_size: int
  kernel_init: Any = nn.initializers.lecun_normal()
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    p = self.patch_size
    b, h, w, c = x.shape
    kernel = self.param("kernel", nn.with_logical_partitioning(
        self.kernel_init, ("patch", "patch", "conv_in", "conv_out")), (p, p, c, self.features),
        self.param_dtype)
    gh, gw = h // p, w // p
    x = x[:, :gh * p, :gw * p].reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(b, gh, gw, p * p * c).astype(self.dtype)
    y = jnp.einsum("bhwk,kd->bhwd", x, kernel.reshape(p * p * c, -1).astype(self.dtype))
    if not self.use_bias:
      return y
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
                      (self.features,), self.param_dtype)
    return y + bias.astype(self.dtype)


class PatchEmbed(nn.Module):
  """Images [B, H, W, C] -> patch tokens [B, H/p, W/p, D].

  conv_stem=False: one p x p conv of stride p (ViT; PyTorch's default init, as upstream).
  conv_stem=True: log2(p) 3x3 convs of stride 2 with GELU (widths D/4, D/2, ... capped at D, at least
  16), then a 1x1 projection to D: a small convolutional stem, which trains a small ViT much faster
  on small data (miniature study: ~40% -> 86% within 2 CPU minutes).
  """
  patch_size: int
  width: int
  conv_stem: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    def conv(f, k, s, name, init):
      return nn.Conv(f, (k, k), (s, s), padding="SAME" if k > s else "VALID", dtype=self.dtype,
                     param_dtype=self.param_dtype, name=name,
                     kernel_init=nn.with_logical_partitioning(
                         init, ("patch", "patch", "conv_in", "conv_out")),
                     bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)))
    if not self.conv_stem:
      return PatchConv(self.width, self.patch_size, torch_default_init, self.dtype,
                       self.param_dtype, name="proj")(x)
    channels = max(self.width // 4, 16)
    for i in range(conv_stem_strides(self.patch_size)):
      x = activations.gelu(conv(channels, 3, 2, f"stem{i}", nn.initializers.lecun_normal())(x))
      channels = min(channels * 2, self.width)
    return conv(self.width, 1, 1, "proj", nn.initializers.lecun_normal())(x)


class ViTEncoder(nn.Module):
  """ViT over images in [-1, 1]: [B, H, W, 3] -> tokens [B, 1 + N, D] (CLS first) or [B, N, D].

  Learned absolute position embeddings `pos_embed` [1, (1 +) g*g, D] (trunc. normal 0.02; BEiT layout,
  CLS position first) for a g x g patch grid, g = image_size // patch_size (image_size None: the grid
  of the images seen at init). Images of another size get the patch part bicubically interpolated
  (torch-compatible; `pos_interp_offset` 0.1 = DINO's/upstream VQ-KD's scale (n + 0.1) / g), the CLS
  position kept. Blocks use BEiT's depth-scaled init when `depth_scaled_init`. `frozen`: no gradient
  is ever taken through the encoder (a frozen teacher; see ViTBlock).
  """
  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  cls_token: bool = True
  conv_stem: bool = False
  image_size: int | None = None
  pos_interp_offset: float | None = None
  depth_scaled_init: bool = True
  approximate_gelu: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  frozen: bool = False

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    x = PatchEmbed(self.patch_size, self.width, self.conv_stem, self.dtype, self.param_dtype,
                   name="patch_embed")(images.astype(self.dtype))
    b, gh, gw, d = x.shape
    x = x.reshape(b, gh * gw, d)
    n_cls = int(self.cls_token)
    if self.image_size is not None:
      g = self.image_size // self.patch_size
    elif gh == gw:
      g = gh
    else:
      raise ValueError(f"non-square patch grid {gh}x{gw}: set image_size")
    pos = self.param("pos_embed", nn.with_logical_partitioning(
        nn.initializers.truncated_normal(0.02), (None, None, "embed")), (1, n_cls + g * g, d),
        self.param_dtype)
    g = math.isqrt(pos.shape[1] - n_cls)  # The grid the parameter was made for.
    patch_pos = pos[:, n_cls:]
    if (gh, gw) != (g, g):
      patch_pos = interpolate_pos_embed(patch_pos.astype(jnp.float32), (gh, gw), (g, g),
                                        self.pos_interp_offset)
    x = x + patch_pos.astype(x.dtype)
    if self.cls_token:
      cls = self.param("cls_token", nn.with_logical_partitioning(
          nn.initializers.truncated_normal(0.02), (None, None, "embed")), (1, 1, d),
          self.param_dtype)
      cls = (cls + pos[:, :1]).astype(x.dtype)
      x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)), x], axis=1)
    for i in range(self.depth):
      x = ViTBlock(self.num_heads, self.mlp_ratio, i if self.depth_scaled_init else None,
                   self.dtype, self.param_dtype, self.approximate_gelu, self.frozen,
                   name=f"block{i}")(x)
    return x


# ---------------------------------------------------------------------------------------------------
# torch.nn.functional.interpolate(mode="bicubic", align_corners=False) as matrices


def _cubic_weights(t: jax.Array, a: float = -0.75) -> jax.Array:
  """Keys cubic-convolution weights of the 4 taps at offsets -1, 0, 1, 2 for fractions t [n]."""
  def w(x):
    x = jnp.abs(x)
    return jnp.where(x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                     jnp.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))
  return jnp.stack([w(t + 1), w(t), w(1 - t), w(2 - t)], axis=-1)


def bicubic_resize_matrix(in_size: int, out_size: int, scale: float | None = None) -> jax.Array:
  """[out, in] matrix of torch's 1-D bicubic interpolation (a = -0.75, align_corners=False, no
  antialias, border taps clamped). `scale` = torch's scale_factor when given (else out / in)."""
  ratio = (1.0 / scale) if scale is not None else in_size / out_size
  src = (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * ratio - 0.5  # Not clamped (cubic).
  i0 = jnp.floor(src)
  weights = _cubic_weights(src - i0)
  idx = jnp.clip(i0[:, None].astype(jnp.int32) + jnp.arange(-1, 3)[None], 0, in_size - 1)
  m = jnp.zeros((out_size, in_size), jnp.float32)
  return m.at[jnp.arange(out_size)[:, None], idx].add(weights)


def interpolate_pos_embed(pos: jax.Array, new_grid: int | tuple[int, int],
                          old_grid: int | tuple[int, int] | None = None,
                          scale_offset: float | None = None) -> jax.Array:
  """Bicubic resize of grid position embeddings [..., gh*gw, D] -> [..., nh*nw, D] (no CLS entry),
  equal to torch.nn.functional.interpolate(mode="bicubic", align_corners=False) on the [D, gh, gw]
  grid. old_grid None: square. `scale_offset` (DINO/BEiT's 0.1 trick, upstream VQ-KD at 256) makes the
  scale factor (new + offset) / old instead of new / old."""
  as_pair = lambda g: (g, g) if isinstance(g, int) else tuple(g)
  if old_grid is None:
    s = math.isqrt(pos.shape[-2])
    if s * s != pos.shape[-2]:
      raise ValueError(f"{pos.shape[-2]} positions are not a square grid: pass old_grid")
    old_grid = s
  (gh, gw), (nh, nw) = as_pair(old_grid), as_pair(new_grid)
  grid = pos.reshape(*pos.shape[:-2], gh, gw, pos.shape[-1])
  sh = None if scale_offset is None else (nh + scale_offset) / gh
  sw = None if scale_offset is None else (nw + scale_offset) / gw
  mh, mw = bicubic_resize_matrix(gh, nh, sh), bicubic_resize_matrix(gw, nw, sw)
  out = jnp.einsum("ih,jw,...hwd->...ijd", mh, mw, grid.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)
  return out.reshape(*pos.shape[:-2], nh * nw, pos.shape[-1]).astype(pos.dtype)
