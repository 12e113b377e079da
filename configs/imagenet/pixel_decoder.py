"""Pixel decoder on frozen VQ-KD or Cluster codes, ImageNet-1k, upstream recipe (upstream §4, §3.2).

  vqkd train --config configs/imagenet/pixel_decoder.py --workdir runs/in1k/decoder_vqkd_clip \
      --config.tokenizer_workdir=runs/in1k/vqkd_clip --config.data.data_dir=$TFDS_DIR \
      --config.loss.perceptual.weights=lpips_vgg.msgpack
  ... :code_dim=768 for Cluster codes (the teacher's width).

VQGAN decoder: pre_decode 1x1 code_dim -> 256, conv_in -> 512, mid Res-Attn-Res, mults (4, 2, 2, 1, 1),
3 ResBlocks per stage, attention at 16x16, 16x16 -> 256x256. Loss: MSE + LPIPS + 0.5 x generator loss
from step 20k (no adaptive weight); PatchGAN depth 3 with hinge loss x 0.5. Adam 1e-4 (0.9, 0.95)
for both, constant; 256 px, `strong`, global batch 128, 400k steps, bf16.
"""

import ml_collections

from vqkd_jax.config import parse_arg, training_config
from vqkd_jax.train.gan import gan_config
from vqkd_jax.train.optimizers import optimizer_config
from vqkd_jax.train.perceptual import perceptual_config
from vqkd_jax.train.reconstruction import reconstruction_config


def get_config(arg=None):
  arg = parse_arg(arg, code_dim=32, runlocal=False)
  c = training_config("pixel_decoder", total_steps=400_000, batch_size=128, precision="bfloat16")
  c.data.name = "imagenet2012"
  c.data.image_size = 256
  c.data.augmentation = "strong"
  c.data.num_classes = 1000
  c.tokenizer_workdir = ""
  c.model = ml_collections.ConfigDict(dict(
      code_dim=arg.code_dim, width=128, channel_mults=(4, 2, 2, 1, 1), num_res_blocks=3,
      attn_stages=(0,), z_channels=256))
  c.loss = reconstruction_config(l1=0.0, mse=1.0, perceptual=perceptual_config(
      kind="lpips", weights="lpips_vgg.msgpack"))
  c.gan = gan_config(width=64, depth=3, weight=0.5, disc_weight=0.5, adaptive=False, start=20_000)
  c.optimizer = optimizer_config(name="adam", lr=1e-4, b1=0.9, b2=0.95, schedule="constant")
  c.disc_optimizer = optimizer_config(name="adam", lr=1e-4, b1=0.9, b2=0.95, schedule="constant")
  c.parallel.strategy = "dp"
  c.log_every = 100
  c.eval_every = 10_000
  c.checkpoint_every = 10_000
  if arg.runlocal:
    c.total_steps, c.batch_size, c.data.synthetic = 2, 8, True
    c.loss.perceptual.kind = "none"
    c.log_every = c.checkpoint_every = 1
    c.eval_every = 0
  return c
