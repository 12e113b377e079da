"""Pixel decoder on frozen tokenizer codes (stage c of the demo; upstream §4 scaled down).

  vqkd train --config configs/demo/pixel_decoder.py --workdir runs/demo/pixel_decoder \
      --config.tokenizer_workdir=runs/demo/tokenizer \
      --config.loss.perceptual.workdir=runs/demo/perceptual

8x8 codes -> 32x32 images through a small VQGAN-style decoder. Loss as upstream's LlamaGen recipe:
MSE + perceptual (the in-the-box network of configs/demo/perceptual.py offline; LPIPS with
`--config.loss.perceptual.kind=lpips --config.loss.perceptual.weights=lpips.msgpack`) + the
PatchGAN generator loss from `gan.start`, the discriminator's hinge loss weighted 0.5; Adam (0.9,
0.95) for both. Unlike upstream's fixed 0.5 weight from the middle of training, the generator term
has VQGAN's adaptive weight (gain 0.75, as configs/demo/vqgan.py) and starts after 68% of the
steps: at the demo's few hundred steps the fixed weight from 50% let the GAN term swamp the
reconstruction loss (measured on VQ-KD_CLIP codes, 300 steps: saturated two-colour images, PSNR
12.7 dB, rFD_eval 847; adaptive from 2/3: 18.6 dB, 208; no GAN: 19.3 dB, 190). `:gan=False` trains the reconstruction loss alone.
`code_dim` must match the tokenizer's (32 for the demo VQ-KD; Cluster: the teacher's width).
"""

import ml_collections

from vqkd_jax.config import parse_arg, training_config
from vqkd_jax.train.gan import gan_config
from vqkd_jax.train.optimizers import optimizer_config
from vqkd_jax.train.perceptual import perceptual_config
from vqkd_jax.train.reconstruction import reconstruction_config


def get_config(arg=None):
  arg = parse_arg(arg, runlocal=False, image_size=32, code_dim=32, gan=True)
  c = training_config("pixel_decoder", total_steps=8 if arg.runlocal else 500, batch_size=64)
  c.data.image_size = arg.image_size
  c.data.name = "shapes_small" if arg.runlocal else "shapes"
  c.tokenizer_workdir = ""
  c.model = ml_collections.ConfigDict(dict(
      code_dim=arg.code_dim, width=32, channel_mults=(2, 1, 1), num_res_blocks=1, input_scale=1.0))
  c.loss = reconstruction_config(l1=0.0, mse=1.0, perceptual=perceptual_config(
      kind="none" if arg.runlocal else "in_the_box"))
  c.optimizer = optimizer_config(name="adam", lr=1e-3, b1=0.9, b2=0.95, schedule="constant")
  if arg.gan:
    c.gan = gan_config(width=32, depth=2, weight=1.0, disc_weight=0.5, adaptive=True,
                       adaptive_gain=0.75, start=0 if arg.runlocal else 340)
    c.disc_optimizer = optimizer_config(name="adam", lr=1e-3, b1=0.9, b2=0.95,
                                        schedule="constant")
  c.log_every = 4 if arg.runlocal else 100
  c.eval_every = c.total_steps
  c.checkpoint_every = c.total_steps
  return c
