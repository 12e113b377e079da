"""Class-conditional masked-token (MaskGIT / MAGE style) prior over VQ-KD tokens on the built-in
data: the non-autoregressive alternative to configs/demo/ar.py.

  vqkd train --config configs/demo/nar.py --workdir runs/demo/nar \
      --config.tokenizer_workdir=runs/demo/tokenizer
  vqkd sample --workdir runs/demo --kind nar         # a grid, runs/demo/sampled_nar_seed0.png
  vqkd bench sample --config configs/demo/nar.py     # random weights, no tokenizer needed

Bidirectional transformer, 4 layers, width 128, over [class] + 64 image tokens (8x8, 256 codes);
cosine-schedule masking, class dropout 0.1 (CFG), loss on the masked tokens only. Samples in 8
parallel steps (`sampling` group). About 2 minutes on 2 CPU cores; `:runlocal` runs 8 steps.
"""

import ml_collections

from vqkd_jax.config import parse_arg, training_config
from vqkd_jax.train.optimizers import optimizer_config


def get_config(arg=None):
  arg = parse_arg(arg, runlocal=False, image_size=32)
  c = training_config("nar", total_steps=8 if arg.runlocal else 1000, batch_size=64)
  c.data.image_size = arg.image_size
  c.data.name = "shapes_small" if arg.runlocal else "shapes"
  c.tokenizer_workdir = ""
  c.class_dropout = 0.1
  c.label_smoothing = 0.0
  c.model = ml_collections.ConfigDict(dict(width=128, depth=4, num_heads=4, dropout=0.0))
  c.sampling = ml_collections.ConfigDict(dict(
      steps=8, cfg_scale=1.75, cfg_schedule="constant", temperature=1.0, choice_temperature=4.5))
  # `vqkd bench sample`: random weights at this size, no tokenizer.
  c.bench = ml_collections.ConfigDict(dict(grid=8, codebook_size=256, batch_size=64))
  c.optimizer = optimizer_config(lr=1e-3, b1=0.9, b2=0.96, eps=1e-8, weight_decay=0.05,
                                 warmup_steps=100, end_lr=0.0, decay="weights")
  c.log_every = 4 if arg.runlocal else 100
  c.eval_every = c.total_steps
  c.checkpoint_every = c.total_steps
  return c
