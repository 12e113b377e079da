"""Pixel decoder: code vectors -> images, the VQGAN decoder shape (upstream §3.1, §4)."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from vqkd_jax.nn.conv import AttnBlock2d, ResBlock, Upsample, conv, group_norm

Dtype = Any


class PixelDecoder(nn.Module):
  """Code vectors [B, h, w, code_dim] -> images [B, h*2^(S-1), w*2^(S-1), 3] (about [-1, 1]).

  1x1 conv to width*channel_mults[0], conv_in, mid (Res-Attn-Res), then one stage per channel
  multiplier (num_res_blocks ResBlocks, attention in the first stage when `attn_first_stage`, an
  upsample after every stage but the last), GroupNorm-SiLU-conv3x3 to 3 channels.
  """
  code_dim: int
  width: int
  channel_mults: Sequence[int] = (4, 2, 2, 1, 1)
  num_res_blocks: int = 3
  attn_first_stage: bool = True
  out_channels: int = 3
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z):
    x = z.astype(self.dtype)
    top = self.width * self.channel_mults[0]
    x = conv(top, 1, name="pre_decode", dtype=self.dtype)(x)
    x = conv(top, 3, name="conv_in", dtype=self.dtype)(x)
    x = ResBlock(top, self.dtype, name="mid_res1")(x)
    x = AttnBlock2d(self.dtype, name="mid_attn")(x)
    x = ResBlock(top, self.dtype, name="mid_res2")(x)
    for s, mult in enumerate(self.channel_mults):
      for r in range(self.num_res_blocks):
        x = ResBlock(self.width * mult, self.dtype, name=f"stage{s}_res{r}")(x)
        if s == 0 and self.attn_first_stage:
          x = AttnBlock2d(self.dtype, name=f"stage{s}_attn{r}")(x)
      if s < len(self.channel_mults) - 1:
        x = Upsample(self.dtype, name=f"stage{s}_up")(x)
    x = nn.silu(group_norm(x.shape[-1], "norm_out", self.dtype)(x))
    return conv(self.out_channels, 3, name="conv_out", dtype=self.dtype)(x).astype(jnp.float32)
