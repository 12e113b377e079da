"""Convolutional blocks of the VQGAN trunk (upstream §3.1): ResBlock, single-head attention over
pixels, nearest-neighbour upsampling and strided downsampling. NHWC; GroupNorm eps 1e-6."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def conv(features: int, kernel: int = 3, stride: int = 1, name: str | None = None,
         dtype: Dtype = jnp.float32, padding: Any = "SAME", param_dtype: Dtype = jnp.float32,
         kernel_init=nn.initializers.lecun_normal()) -> nn.Conv:
  """k x k conv with kernel named (patch, patch, conv_in, conv_out) and bias named conv_out."""
  return nn.Conv(features, (kernel, kernel), (stride, stride), padding=padding, dtype=dtype,
                 param_dtype=param_dtype, name=name,
                 kernel_init=nn.with_logical_partitioning(
                     kernel_init, ("patch", "patch", "conv_in", "conv_out")),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)))


def num_groups(channels: int, groups: int = 32) -> int:
  """32 groups, halved until they divide `channels` (small demo widths)."""
  while channels % groups:
    groups //= 2
  return groups


def group_norm(channels: int, name: str | None = None, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32) -> nn.GroupNorm:
  """GroupNorm(32 or fewer groups, eps 1e-6), statistics in float32, `norm`-named scale/bias."""
  return nn.GroupNorm(num_groups=num_groups(channels), epsilon=1e-6, dtype=dtype,
                      param_dtype=param_dtype, name=name,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)))


class ResBlock(nn.Module):
  """x + conv3x3(SiLU(GN(conv3x3(SiLU(GN(x)))))): [B, H, W, C] -> [B, H, W, features]; the shortcut is
  a 1x1 conv when C != features. No dropout."""
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = nn.silu(group_norm(x.shape[-1], "norm1", **kw)(x))
    h = conv(self.features, 3, name="conv1", **kw)(h)
    h = nn.silu(group_norm(self.features, "norm2", **kw)(h))
    h = conv(self.features, 3, name="conv2", **kw)(h)
    if x.shape[-1] != self.features:
      x = conv(self.features, 1, name="shortcut", **kw)(x)
    return x + h


class AttnBlock2d(nn.Module):
  """x + proj(softmax(q k^T / sqrt(C)) v) over the h*w positions, with q, k, v = 1x1 convs of GN(x):
  single-head, [B, H, W, C] -> [B, H, W, C] (taming's AttnBlock; softmax in float32)."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    y = group_norm(c, "norm", **kw)(x)
    q, k, v = (conv(c, 1, name=n, **kw)(y).reshape(b, h * w, c) for n in "qkv")
    logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) * c ** -0.5
    attn = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bqk,bkc->bqc", attn, v).reshape(b, h, w, c)
    return x + conv(c, 1, name="proj", **kw)(out)


class Upsample(nn.Module):
  """Nearest-neighbour x2 then conv3x3: [B, H, W, C] -> [B, 2H, 2W, C]."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return conv(x.shape[-1], 3, name="conv", dtype=self.dtype, param_dtype=self.param_dtype)(x)


class Downsample(nn.Module):
  """Zero-pad (0, 1) on height and width, then conv3x3 of stride 2 without padding:
  [B, H, W, C] -> [B, H/2, W/2, C] (taming's Downsample)."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return conv(x.shape[-1], 3, 2, name="conv", dtype=self.dtype, padding="VALID",
                param_dtype=self.param_dtype)(x)
