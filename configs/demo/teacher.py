"""In-the-box supervised ViT teacher on the built-in dataset (stage a of the demo).

  vqkd train --config configs/demo/teacher.py --workdir runs/demo/teacher

About 1.5 minutes on 2 CPU cores; validation accuracy about 0.9 and patch tokens that stay distinct
(eval/token_similarity well below 1). `:runlocal` trains a few steps only (tests).
"""

import ml_collections

from vqkd_jax.config import parse_arg, training_config
from vqkd_jax.train.optimizers import optimizer_config


def get_config(arg=None):
  arg = parse_arg(arg, runlocal=False, image_size=32)
  c = training_config("teacher", total_steps=8 if arg.runlocal else 500, batch_size=64)
  c.data.image_size = arg.image_size
  c.data.name = "shapes_small" if arg.runlocal else "shapes"
  c.model = ml_collections.ConfigDict(dict(
      image_size=arg.image_size, patch_size=4, width=96, depth=4, num_heads=4, num_classes=12,
      conv_stem=True))
  c.patch_loss_weight = 1.0
  c.optimizer = optimizer_config(lr=2e-3, weight_decay=0.05, warmup_steps=100, end_lr=1e-5)
  c.log_every = 4 if arg.runlocal else 100
  c.eval_every = c.total_steps
  c.checkpoint_every = c.total_steps
  return c
