"""Pixel-reconstruction tokenizers on the VQGAN trunk (upstream §3.1, §3.3): VQGAN and FSQ.

images [-1, 1] -> VQGANEncoder -> post_encode (1x1 convs) -> quantizer -> pre_decode + decoder
(tokenizers.pixel_decoder.PixelDecoder) -> images. The quantizer is a gradient-trained
`quantizers.VectorQuantizer` (VQGAN: L2, beta 0.25; CVQ-VAE: cosine + anchors) or `quantizers.FSQ`.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqkd_jax import quantizers
from vqkd_jax.nn.conv import AttnBlock2d, Downsample, ResBlock, conv, group_norm
from vqkd_jax.tokenizers.pixel_decoder import PixelDecoder

Dtype = Any


class VQGANEncoder(nn.Module):
  """Images [B, H, W, 3] -> features [B, H / 2^(S-1), W / 2^(S-1), z_channels], S = len(channel_mults).

  conv_in 3x3 -> width; per stage s: num_res_blocks ResBlocks at width * channel_mults[s] (each
  followed by attention when s is in attn_stages), a stride-2 Downsample after every stage but the
  last; mid Res-Attn-Res; GroupNorm-SiLU-conv3x3 -> z_channels. Upstream (ImageNet, 256 -> 16x16):
  width 128, channel_mults (1, 1, 2, 2, 4), num_res_blocks 2, attention in the last stage, z 256.
  """
  width: int = 128
  channel_mults: Sequence[int] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  attn_stages: Sequence[int] = (4,)
  z_channels: int = 256
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = conv(self.width, 3, name="conv_in", **kw)(images.astype(self.dtype))
    last = len(self.channel_mults) - 1
    for s, mult in enumerate(self.channel_mults):
      for r in range(self.num_res_blocks):
        x = ResBlock(self.width * mult, name=f"stage{s}_res{r}", **kw)(x)
        if s in tuple(self.attn_stages):
          x = AttnBlock2d(name=f"stage{s}_attn{r}", **kw)(x)
      if s < last:
        x = Downsample(name=f"stage{s}_down", **kw)(x)
    top = x.shape[-1]
    x = ResBlock(top, name="mid_res1", **kw)(x)
    x = AttnBlock2d(name="mid_attn", **kw)(x)
    x = ResBlock(top, name="mid_res2", **kw)(x)
    x = nn.silu(group_norm(top, "norm_out", **kw)(x))
    return conv(self.z_channels, 3, name="conv_out", **kw)(x)


class VQGANTokenizer(nn.Module):
  """The VQGAN / FSQ tokenizer.

  Attributes:
    quantizer: "vq" (VectorQuantizer: num_codes x code_dim, `distance`, `beta`, `normalize`,
      `anchors` for CVQ-VAE) or "fsq" (levels; code_dim = len(levels), num_codes = prod(levels)).
    width, encoder_mults, encoder_blocks, encoder_attn, decoder_mults, decoder_blocks, decoder_attn,
      z_channels: the trunk (defaults: upstream ImageNet f16).
    connector_depth: 1x1 convs of post_encode (z -> ... -> code_dim) and pre_decode (code_dim -> z):
      1 for VQGAN, 2 for FSQ (upstream §3.3).
    axis_name: pmap axis of the codebook statistics (None under jit).

  __call__(images [-1, 1], train) -> dict: recon [B, H, W, 3] float32, decoder_features (input of
  the decoder's last conv), indices [B, h, w], quantizer_loss, usage_counts [K], and the quantizer's
  other losses. Methods: encode (indices), lookup (indices -> code vectors), decode_codes (code
  vectors -> images), decode (indices -> images).
  """
  quantizer: str = "vq"
  num_codes: int = 8192
  code_dim: int = 256
  levels: Sequence[int] = (8, 8, 5, 5, 5)
  distance: str = "l2"
  beta: float = 0.25
  normalize: bool = False
  anchors: bool = False
  width: int = 128
  encoder_mults: Sequence[int] = (1, 1, 2, 2, 4)
  encoder_blocks: int = 2
  encoder_attn: Sequence[int] = (4,)
  decoder_mults: Sequence[int] = (4, 2, 2, 1, 1)
  decoder_blocks: int = 3
  decoder_attn: Sequence[int] = (0,)
  z_channels: int = 256
  connector_depth: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  axis_name: Any = None

  @property
  def codes_dim(self) -> int:
    return len(self.levels) if self.quantizer == "fsq" else self.code_dim

  @property
  def vocab_size(self) -> int:
    import math
    return math.prod(self.levels) if self.quantizer == "fsq" else self.num_codes

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.encoder = VQGANEncoder(self.width, tuple(self.encoder_mults), self.encoder_blocks,
                                tuple(self.encoder_attn), self.z_channels, **kw)
    self.post_encode = [conv(self.z_channels if i < self.connector_depth - 1 else self.codes_dim, 1,
                             name=f"post_encode{i}", **kw) for i in range(self.connector_depth)]
    if self.quantizer == "vq":
      self.quant = quantizers.VectorQuantizer(
          self.num_codes, self.code_dim, distance=self.distance, beta=self.beta,
          normalize=self.normalize, anchors=self.anchors, axis_name=self.axis_name)
    elif self.quantizer == "fsq":
      self.quant = quantizers.FSQ(tuple(self.levels), axis_name=self.axis_name)
    else:
      raise ValueError(f"unknown quantizer {self.quantizer!r}: vq, fsq")
    self.decoder = PixelDecoder(self.codes_dim, self.width, tuple(self.decoder_mults),
                                self.decoder_blocks, tuple(self.decoder_attn),
                                z_channels=self.z_channels, pre_decode_depth=self.connector_depth,
                                **kw)

  def _features(self, images: jax.Array) -> jax.Array:
    x = self.encoder(images)
    for layer in self.post_encode:
      x = layer(x)
    return x.astype(jnp.float32)

  def __call__(self, images: jax.Array, train: bool = False) -> dict:
    q = self.quant(self._features(images), train=train)
    recon, features = self.decoder(q["quantized"], return_features=True)
    out = {k: v for k, v in q.items() if k not in ("quantized", "loss")}
    out.update(recon=recon, decoder_features=features, quantizer_loss=q["loss"])
    return out

  def encode(self, images: jax.Array) -> jax.Array:
    """Images [-1, 1] -> int32 indices [B, h, w]."""
    return self.quant(self._features(images), train=False)["indices"]

  def lookup(self, indices: jax.Array) -> jax.Array:
    """Indices [B, h, w] -> code vectors [B, h, w, code_dim] (what the decoder reads)."""
    return self.quant.lookup(indices).astype(jnp.float32)

  def decode_codes(self, codes: jax.Array) -> jax.Array:
    return self.decoder(codes)

  def decode(self, indices: jax.Array) -> jax.Array:
    """Indices [B, h, w] -> images [B, H, W, 3] in about [-1, 1]."""
    return self.decoder(self.lookup(indices))
