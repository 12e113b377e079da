"""Class-conditional AR prior over VQ-KD tokens (stage d of the demo).

  vqkd train --config configs/demo/ar.py --workdir runs/demo/ar \
      --config.tokenizer_workdir=runs/demo/tokenizer

GPT-2 style, 3 layers, width 128, sequence [class] + 64 image tokens, class dropout 0.1 (CFG).
About 1.5 minutes on 2 CPU cores. `variant=llama` switches the flavour.
"""

import ml_collections

from vqkd_jax.config import parse_arg, training_config
from vqkd_jax.train.optimizers import optimizer_config


def get_config(arg=None):
  arg = parse_arg(arg, runlocal=False, image_size=32, variant="gpt2")
  c = training_config("ar", total_steps=8 if arg.runlocal else 1000, batch_size=64)
  c.data.image_size = arg.image_size
  c.data.name = "shapes_small" if arg.runlocal else "shapes"
  c.tokenizer_workdir = ""
  c.class_dropout = 0.1
  c.model = ml_collections.ConfigDict(dict(
      width=128, depth=3, num_heads=4, flavour=arg.variant))
  c.optimizer = optimizer_config(lr=1e-3, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.05,
                                 warmup_steps=100, end_lr=0.0, decay="all")
  c.log_every = 4 if arg.runlocal else 100
  c.eval_every = c.total_steps
  c.checkpoint_every = c.total_steps
  return c
