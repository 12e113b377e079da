"""VQGAN and FSQ tokenizers on ImageNet-1k with the upstream recipe (upstream §3.1, §3.3, §7).

  vqkd train --config configs/imagenet/vqgan.py:codes=8192 --workdir runs/in1k/vqgan_8192 \
      --config.data.data_dir=$TFDS_DIR --config.loss.perceptual.weights=lpips_vgg.msgpack
  vqkd train --config configs/imagenet/vqgan.py:codes=8000 ...     # FSQ [8, 8, 5, 5, 5]
  vqkd train --config configs/imagenet/vqgan.py:codes=64000 ...    # FSQ [8, 8, 8, 5, 5, 5]

codes=8192 (default): VQGAN "8192_dd2_aglwg075": encoder width 128, mults (1, 1, 2, 2, 4), 2 blocks,
attention in the last stage; decoder mults (4, 2, 2, 1, 1), 3 blocks, attention at 16x16; z 256;
8192 codes of dim 256, L2, beta 0.25, U(-1/K, 1/K) init; L1 + LPIPS (weights 1) + PatchGAN depth 2
with the adaptive weight x 0.75, GAN from step 0. codes=8000 / 64000: FSQ on the same trunk with two
1x1 convs each side, PatchGAN depth 3, adaptive gain 0.8. `:cvq=True` (VQGAN only): the CVQ-VAE
variant (cosine distance + anchors, §3.4). Adam (0.5, 0.9): generator 5.4e-5, discriminator
4.32e-4, constant; 256 px, `strong` augmentation, global batch 96, 260k steps, bf16. LPIPS needs
converted weights (`vqkd convert lpips`); without them set `--config.loss.perceptual.kind=none`.
"""

import ml_collections

from vqkd_jax.config import parse_arg, training_config
from vqkd_jax.train.gan import gan_config
from vqkd_jax.train.optimizers import optimizer_config
from vqkd_jax.train.perceptual import perceptual_config
from vqkd_jax.train.reconstruction import reconstruction_config

FSQ_LEVELS = {8000: (8, 8, 5, 5, 5), 64000: (8, 8, 8, 5, 5, 5)}


def get_config(arg=None):
  arg = parse_arg(arg, codes=8192, cvq=False, runlocal=False)
  if arg.codes not in (8192, 8000, 64000):
    raise ValueError(f"codes must be 8192 (VQGAN), 8000 or 64000 (FSQ), got {arg.codes}")
  fsq = arg.codes in FSQ_LEVELS
  c = training_config("vqgan", total_steps=260_000, batch_size=96, precision="bfloat16")
  c.data.name = "imagenet2012"
  c.data.image_size = 256
  c.data.augmentation = "strong"
  c.data.num_classes = 1000
  c.model = ml_collections.ConfigDict(dict(
      quantizer="fsq" if fsq else "vq", num_codes=8192, code_dim=256,
      levels=FSQ_LEVELS.get(arg.codes, (8, 8, 5, 5, 5)),
      distance="cosine" if arg.cvq else "l2", beta=0.25, anchors=bool(arg.cvq),
      width=128, encoder_mults=(1, 1, 2, 2, 4), encoder_blocks=2, encoder_attn=(4,),
      decoder_mults=(4, 2, 2, 1, 1), decoder_blocks=3, decoder_attn=(0,), z_channels=256,
      connector_depth=2 if fsq else 1))
  c.loss = reconstruction_config(l1=1.0, mse=0.0, perceptual=perceptual_config(
      kind="lpips", weights="lpips_vgg.msgpack"))
  c.gan = gan_config(width=64, depth=3 if fsq else 2, adaptive=True,
                     adaptive_gain=0.8 if fsq else 0.75, start=0)
  c.optimizer = optimizer_config(name="adam", lr=5.4e-5, b1=0.5, b2=0.9, schedule="constant")
  c.disc_optimizer = optimizer_config(name="adam", lr=4.32e-4, b1=0.5, b2=0.9, schedule="constant")
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
