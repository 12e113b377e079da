"""Pixel decoder on the frozen VQ-KD codes (stage c of the demo).

  vqkd train --config configs/demo/pixel_decoder.py --workdir runs/demo/pixel_decoder \
      --config.tokenizer_workdir=runs/demo/tokenizer

8x8 codes -> 32x32 images through a small VQGAN-style decoder, MSE + L1. About 1 minute on 2 cores.
"""

import ml_collections

from vqkd_jax.config import parse_arg, training_config
from vqkd_jax.train.optimizers import optimizer_config


def get_config(arg=None):
  arg = parse_arg(arg, runlocal=False, image_size=32)
  c = training_config("pixel_decoder", total_steps=8 if arg.runlocal else 500, batch_size=64)
  c.data.image_size = arg.image_size
  c.data.name = "shapes_small" if arg.runlocal else "shapes"
  c.tokenizer_workdir = ""
  c.model = ml_collections.ConfigDict(dict(
      code_dim=32, width=32, channel_mults=(2, 1, 1), num_res_blocks=1))
  c.optimizer = optimizer_config(name="adam", lr=1e-3, b1=0.9, b2=0.95, schedule="constant")
  c.log_every = 4 if arg.runlocal else 100
  c.eval_every = c.total_steps
  c.checkpoint_every = c.total_steps
  return c
