"""Pixel decoder: code vectors -> images, the VQGAN/LlamaGen decoder shape (upstream §3.1, §4)."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqkd_jax.nn.conv import AttnBlock2d, ResBlock, Upsample, conv, group_norm

Dtype = Any


class PixelDecoder(nn.Module):
  """Code vectors [B, h, w, code_dim] -> images [B, h * 2^(S-1), w * 2^(S-1), out_channels] in about
  [-1, 1] (no tanh, as VQGAN), S = len(channel_mults).

  pre_decode: `pre_decode_depth` 1x1 convs code_dim -> z_channels (default width * channel_mults[0];
  upstream VQGAN 256, FSQ two convs); conv_in 3x3 -> width * channel_mults[0]; mid Res-Attn-Res; then per
  stage s: num_res_blocks ResBlocks at width * channel_mults[s] (each followed by attention when s is
  in attn_stages), nearest x2 + conv3x3 after every stage but the last; GroupNorm-SiLU-conv3x3.
  input_scale multiplies the codes first (e.g. sqrt(code_dim) for unit-norm codes, whose entries
  are ~1/sqrt(code_dim)).
  Upstream (ImageNet, 16x16 -> 256x256): width 128, channel_mults (4, 2, 2, 1, 1), num_res_blocks 3,
  attention in stage 0. Demo (8x8 -> 32x32): e.g. width 64, channel_mults (2, 1, 1), 1 block.
  """
  code_dim: int
  width: int
  channel_mults: Sequence[int] = (4, 2, 2, 1, 1)
  num_res_blocks: int = 3
  attn_stages: Sequence[int] = (0,)
  out_channels: int = 3
  z_channels: int = 0
  pre_decode_depth: int = 1
  input_scale: float = 1.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array, return_features: bool = False):
    """z [B, h, w, code_dim] -> images; with `return_features`, (images, features) where features
    [B, H, W, width * channel_mults[-1]] are the input of the last conv (`conv_out`: what the
    adaptive GAN weight differentiates, upstream's `last_parameter`)."""
    if z.shape[-1] != self.code_dim:
      raise ValueError(f"expected codes of dim {self.code_dim}, got {z.shape}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = (z * self.input_scale).astype(self.dtype) if self.input_scale != 1.0 else z.astype(self.dtype)
    top = self.width * self.channel_mults[0]
    zc = self.z_channels or top
    for i in range(self.pre_decode_depth):
      x = conv(zc, 1, name="pre_decode" if i == 0 else f"pre_decode{i}", **kw)(x)
    x = conv(top, 3, name="conv_in", **kw)(x)
    x = ResBlock(top, name="mid_res1", **kw)(x)
    x = AttnBlock2d(name="mid_attn", **kw)(x)
    x = ResBlock(top, name="mid_res2", **kw)(x)
    for s, mult in enumerate(self.channel_mults):
      for r in range(self.num_res_blocks):
        x = ResBlock(self.width * mult, name=f"stage{s}_res{r}", **kw)(x)
        if s in tuple(self.attn_stages):
          x = AttnBlock2d(name=f"stage{s}_attn{r}", **kw)(x)
      if s < len(self.channel_mults) - 1:
        x = Upsample(name=f"stage{s}_up", **kw)(x)
    x = nn.silu(group_norm(x.shape[-1], "norm_out", **kw)(x))
    images = conv(self.out_channels, 3, name="conv_out", **kw)(x).astype(jnp.float32)
    return (images, x) if return_features else images
