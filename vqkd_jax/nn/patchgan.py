"""PatchGAN discriminator (upstream §3.1; taming / pix2pix NLayerDiscriminator). NHWC."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def _conv(features: int, stride: int, use_bias: bool, name: str, dtype: Dtype, param_dtype: Dtype):
  """4x4 conv, padding 1, N(0, 0.02) init (upstream's weights_init)."""
  return nn.Conv(features, (4, 4), (stride, stride), padding=((1, 1), (1, 1)), use_bias=use_bias,
                 dtype=dtype, param_dtype=param_dtype, name=name,
                 kernel_init=nn.with_logical_partitioning(
                     nn.initializers.normal(0.02), ("patch", "patch", "conv_in", "conv_out")),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)))


class PatchGAN(nn.Module):
  """Images [B, H, W, C] in [-1, 1] -> patch logits [B, H', W', 1] (float32).

  conv4x4 s2 (width) + LeakyReLU 0.2; for n = 1 .. depth-1: conv4x4 s2 (width * min(2^n, 8), no
  bias) + BatchNorm + LeakyReLU; conv4x4 s1 (width * min(2^depth, 8), no bias) + BatchNorm +
  LeakyReLU; conv4x4 s1 -> 1. depth 3 (64-128-256-512-1) by default, 2 in VQGAN's "dd2" recipe.
  BatchNorm as torch's (momentum 0.1, eps 1e-5; scale init N(1, 0.02)): batch statistics in
  training (global: under jit the batch axis is sharded, under pmap they are averaged over
  `axis_name`), running averages otherwise, in the "batch_stats" collection.
  """
  width: int = 64
  depth: int = 3
  axis_name: Any = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = True) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = _conv(self.width, 2, True, "conv0", **kw)(images.astype(self.dtype))
    x = nn.leaky_relu(x, 0.2)
    for n in range(1, self.depth + 1):
      features = self.width * min(2 ** n, 8)
      x = _conv(features, 2 if n < self.depth else 1, False, f"conv{n}", **kw)(x)
      x = nn.BatchNorm(
          use_running_average=not train, momentum=0.9, epsilon=1e-5, axis_name=(
              self.axis_name if train and not self.is_initializing() else None),
          dtype=self.dtype, param_dtype=self.param_dtype, name=f"norm{n}",
          scale_init=nn.with_logical_partitioning(
              lambda k, s, d=jnp.float32: 1.0 + 0.02 * jax.random.normal(k, s, d), ("norm",)),
          bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)))(x)
      x = nn.leaky_relu(x, 0.2)
    x = _conv(1, 1, True, "conv_out", **kw)(x)
    return x.astype(jnp.float32)
