"""The evaluator network for FD_eval on the built-in dataset (stage a of the demo).

  vqkd train --config configs/demo/evaluator.py --workdir runs/demo/evaluator

A CNN trained under nuisance augmentation; about 1 minute on 2 CPU cores, validation accuracy >= 0.9.
"""

import ml_collections

from vqkd_jax.config import parse_arg, training_config
from vqkd_jax.train.optimizers import optimizer_config


def get_config(arg=None):
  arg = parse_arg(arg, runlocal=False, image_size=32)
  c = training_config("evaluator", total_steps=8 if arg.runlocal else 400, batch_size=64)
  c.data.image_size = arg.image_size
  c.data.name = "shapes_small" if arg.runlocal else "shapes"
  c.model = ml_collections.ConfigDict(dict(num_classes=12, width=24, blocks_per_stage=1))
  c.optimizer = optimizer_config(lr=2e-3, weight_decay=1e-4, warmup_steps=50, end_lr=1e-5)
  c.log_every = 4 if arg.runlocal else 100
  c.eval_every = c.total_steps
  c.checkpoint_every = c.total_steps
  return c
