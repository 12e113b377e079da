"""Convolutional blocks of the VQGAN trunk (upstream §3.1): ResBlock, attention over pixels,
nearest-neighbour upsampling and strided downsampling. NHWC."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def conv(features: int, kernel: int = 3, stride: int = 1, name: str | None = None,
         dtype: Dtype = jnp.float32, padding="SAME"):
  return nn.Conv(features, (kernel, kernel), (stride, stride), padding=padding, dtype=dtype,
                 name=name,
                 kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                          ("patch", "patch", "conv_in", "conv_out")),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)))


def group_norm(channels: int, name: str | None = None, dtype: Dtype = jnp.float32):
  """GroupNorm(32, eps 1e-6), with fewer groups when the channels are few."""
  groups = 32
  while channels % groups:
    groups //= 2
  return nn.GroupNorm(num_groups=groups, epsilon=1e-6, dtype=dtype, name=name,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)))


class ResBlock(nn.Module):
  """GN-SiLU-conv3x3-GN-SiLU-conv3x3 plus a 1x1 shortcut when the width changes."""
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = conv(self.features, 3, name="conv1", dtype=self.dtype)(
        nn.silu(group_norm(x.shape[-1], "norm1", self.dtype)(x)))
    h = conv(self.features, 3, name="conv2", dtype=self.dtype)(
        nn.silu(group_norm(self.features, "norm2", self.dtype)(h)))
    if x.shape[-1] != self.features:
      x = conv(self.features, 1, name="shortcut", dtype=self.dtype)(x)
    return x + h


class AttnBlock2d(nn.Module):
  """GroupNorm then single-head self-attention over the h*w positions, residual."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    y = group_norm(c, "norm", self.dtype)(x).reshape(b, h * w, c)
    q, k, v = (conv(c, 1, name=n, dtype=self.dtype)(y[:, :, None, :])[:, :, 0] for n in "qkv")
    attn = jax.nn.softmax((jnp.einsum("bqc,bkc->bqk", q, k) * c ** -0.5).astype(jnp.float32), -1)
    out = jnp.einsum("bqk,bkc->bqc", attn.astype(v.dtype), v)
    out = conv(c, 1, name="proj", dtype=self.dtype)(out[:, :, None, :])[:, :, 0]
    return x + out.reshape(b, h, w, c)


class Upsample(nn.Module):
  """Nearest x2 then conv3x3."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    x = jax.image.resize(x, (b, 2 * h, 2 * w, c), "nearest")
    return conv(c, 3, name="conv", dtype=self.dtype)(x)


class Downsample(nn.Module):
  """Zero-pad (0, 1) on height and width, then conv3x3 stride 2 without padding."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return conv(x.shape[-1], 3, 2, name="conv", dtype=self.dtype, padding="VALID")(x)
