"""VQ-KD tokenizer distilled from the in-the-box ViT teacher (stage b of the demo).

  vqkd train --config configs/demo/vqkd.py --workdir runs/demo/tokenizer \
      --config.teacher.workdir=runs/demo/teacher

256 codes of dim 32 on an 8x8 grid (32x32 images, patch 4); cosine codebook with EMA 0.99 and
spherical k-means init; one-block feature decoder to the teacher's width. About 2 minutes on 2 CPU
cores; codebook usage near 100%. `:teacher=vit|mae|clip|dino` picks the in-the-box teacher (its
stage trained by configs/demo/teacher{,_mae,_clip,_dino}.py; pass its workdir). Upstream recipe
(ImageNet): configs/imagenet/vqkd.py.
"""

import ml_collections

from vqkd_jax.config import parse_arg, training_config
from vqkd_jax.train.optimizers import optimizer_config


def get_config(arg=None):
  arg = parse_arg(arg, runlocal=False, image_size=32, teacher="vit")
  c = training_config("vqkd", total_steps=8 if arg.runlocal else 600, batch_size=64)
  c.data.image_size = arg.image_size
  c.data.name = "shapes_small" if arg.runlocal else "shapes"
  c.teacher = ml_collections.ConfigDict(dict(kind=f"in_the_box_{arg.teacher}", workdir="",
                                              center_targets=True))
  c.model = ml_collections.ConfigDict(dict(
      image_size=arg.image_size, patch_size=4, width=96, depth=4, num_heads=4, conv_stem=True,
      num_codes=256, code_dim=32, decoder_width=96, decoder_depth=1, decoder_heads=4,
      teacher_dim=96, restart_below=1.0, restart_decay=0.9))
  c.optimizer = optimizer_config(lr=1e-3, b1=0.9, b2=0.99, weight_decay=1e-4, warmup_steps=50,
                                 end_lr=1e-5)
  c.log_every = 4 if arg.runlocal else 100
  c.eval_every = c.total_steps
  c.checkpoint_every = c.total_steps
  return c
