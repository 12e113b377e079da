"""Cluster tokenizer on ImageNet-1k with the upstream recipe (upstream §3.7, §7): a frozen CLIP
ViT-B/16 without its projection (768-d post-LN patch tokens at 256 px: a 16x16 grid, positions
interpolated 14 -> 16), 8192 cosine codes of dim 768 trained by Adam 5.4e-5 (0.5, 0.9) on the codebook
loss alone with CVQ-VAE dead-code replacement (EMA 0.99), constant LR, 100k steps, global batch
256, `strong` augmentation.

  vqkd train --config configs/imagenet/cluster.py:teacher=clip --workdir runs/in1k/cluster_clip \
      --config.data.data_dir=$TFDS_DIR --config.teacher.path=/ckpt/clip-vit-base-patch16

teacher: clip (default), dino, mae, vit (all 768-d), or random (benchmark, no download). The pixel
decoder is then trained on its codes: configs/imagenet/pixel_decoder.py with the tokenizer workdir.
"""

import ml_collections

from vqkd_jax.config import parse_arg, training_config
from vqkd_jax.train.optimizers import optimizer_config

TEACHERS = {"clip": ("clip", "openai/clip-vit-base-patch16"), "dino": ("dino", "facebook/dino-vitb16"),
            "mae": ("mae", "facebook/vit-mae-base"), "vit": ("vit", "google/vit-base-patch16-224"),
            "random": ("random_vit", "")}


def get_config(arg=None):
  arg = parse_arg(arg, teacher="clip", runlocal=False)
  if arg.teacher not in TEACHERS:
    raise ValueError(f"teacher must be one of {sorted(TEACHERS)}, got {arg.teacher!r}")
  kind, path = TEACHERS[arg.teacher]
  c = training_config("cluster", total_steps=100_000, batch_size=256, precision="bfloat16")
  c.data.name = "imagenet2012"
  c.data.image_size = 256
  c.data.augmentation = "strong"
  c.data.num_classes = 1000
  if kind == "random_vit":
    c.teacher = ml_collections.ConfigDict(dict(kind=kind, patch_size=16, width=768, depth=12,
                                                num_heads=12, image_size=256, out_dim=0))
  else:
    c.teacher = ml_collections.ConfigDict(dict(kind=kind, path=path, image_size=256,
                                                with_projection=False))
  c.model = ml_collections.ConfigDict(dict(num_codes=8192, anchor_ema=0.99))
  c.optimizer = optimizer_config(name="adam", lr=5.4e-5, b1=0.5, b2=0.9, schedule="constant")
  c.parallel.strategy = "fsdp"
  c.log_every = 100
  c.eval_every = 10_000
  c.checkpoint_every = 10_000
  if arg.runlocal:
    c.total_steps, c.batch_size, c.data.synthetic = 2, 8, True
    c.log_every = c.checkpoint_every = 1
    c.eval_every = 0
  return c
