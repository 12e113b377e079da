"""Pixel-reconstruction tokenizers on the built-in data: VQGAN (`:quantizer=vq`, default) or FSQ
(`:quantizer=fsq`) on the same small VQGAN trunk (upstream §3.1, §3.3, scaled down).

  vqkd train --config configs/demo/vqgan.py --workdir runs/demo/vqgan \
      --config.loss.perceptual.workdir=runs/demo/perceptual
  vqkd train --config configs/demo/vqgan.py:quantizer=fsq --workdir runs/demo/fsq ...

32x32 images -> 8x8 codes (two stride-2 stages); VQGAN: 256 codes of dim 32, L2, beta 0.25;
FSQ: levels [8, 6, 5] (240 codes, the FSQ paper's choice for ~2^8). Loss: L1 + perceptual (the
in-the-box network of configs/demo/perceptual.py; `--config.loss.perceptual.kind=lpips` with
converted weights, or `none`) + PatchGAN hinge with the adaptive weight; the GAN starts at
`gan.start`. Adam (0.5, 0.9) for both players, the discriminator's rate 8x (the upstream ratio).
"""

import ml_collections

from vqkd_jax.config import parse_arg, training_config
from vqkd_jax.train.gan import gan_config
from vqkd_jax.train.optimizers import optimizer_config
from vqkd_jax.train.perceptual import perceptual_config
from vqkd_jax.train.reconstruction import reconstruction_config


def get_config(arg=None):
  arg = parse_arg(arg, runlocal=False, image_size=32, quantizer="vq")
  if arg.quantizer not in ("vq", "fsq"):
    raise ValueError(f"quantizer must be vq or fsq, got {arg.quantizer!r}")
  c = training_config("vqgan", total_steps=8 if arg.runlocal else 600, batch_size=64)
  c.data.image_size = arg.image_size
  c.data.name = "shapes_small" if arg.runlocal else "shapes"
  c.model = ml_collections.ConfigDict(dict(
      quantizer=arg.quantizer, num_codes=256, code_dim=32, levels=(8, 6, 5), distance="l2",
      beta=0.25, width=32, encoder_mults=(1, 2, 2), encoder_blocks=1, encoder_attn=(2,),
      decoder_mults=(2, 2, 1), decoder_blocks=1, decoder_attn=(0,), z_channels=64,
      connector_depth=2 if arg.quantizer == "fsq" else 1))
  c.loss = reconstruction_config(l1=1.0, perceptual=perceptual_config(
      kind="none" if arg.runlocal else "in_the_box"))
  c.gan = gan_config(width=32, depth=2, adaptive=True, adaptive_gain=0.75,
                     start=0 if arg.runlocal else 300)
  c.optimizer = optimizer_config(name="adam", lr=5e-4, b1=0.5, b2=0.9, schedule="constant")
  c.disc_optimizer = optimizer_config(name="adam", lr=5e-4, b1=0.5, b2=0.9, schedule="constant")
  c.log_every = 4 if arg.runlocal else 100
  c.eval_every = c.total_steps
  c.checkpoint_every = c.total_steps
  return c
