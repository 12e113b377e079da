"""The in-the-box perceptual network (offline stand-in for LPIPS's VGG16): a CNN classifier trained
on the built-in data with the evaluator stage's code, but its own seed and width, so that the
GAN-trained decoders never optimise the FD_eval evaluator's own features.

  vqkd train --config configs/demo/perceptual.py --workdir runs/demo/perceptual

Read by `--config.loss.perceptual.workdir=runs/demo/perceptual` (kind in_the_box) of
configs/demo/vqgan.py and configs/demo/pixel_decoder.py (train/perceptual.py). 300 steps: about one
minute on 2 busy CPU cores, validation accuracy 0.50 (measured; 12 classes under the evaluator's
nuisance augmentation). It is a feature extractor, not a metric: accuracy is not gated.
"""

from vqkd_jax.config import parse_arg, training_config
from vqkd_jax.train.optimizers import optimizer_config

import ml_collections


def get_config(arg=None):
  arg = parse_arg(arg, runlocal=False, image_size=32, seed=1)
  c = training_config("evaluator", total_steps=8 if arg.runlocal else 300, batch_size=64)
  c.seed = arg.seed
  c.data.image_size = arg.image_size
  c.data.name = "shapes_small" if arg.runlocal else "shapes"
  c.model = ml_collections.ConfigDict(dict(num_classes=12, width=16, stage_mults=(1, 2, 4),
                                           blocks_per_stage=1, pool="mean"))
  c.optimizer = optimizer_config(lr=2e-3, weight_decay=1e-4, warmup_steps=50, end_lr=1e-5)
  c.log_every = 4 if arg.runlocal else 100
  c.eval_every = c.total_steps
  c.checkpoint_every = c.total_steps
  return c
