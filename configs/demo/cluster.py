"""Cluster tokenizer on the built-in dataset: the in-the-box teacher's patch tokens, clustered online.

  vqkd train --config configs/demo/cluster.py --workdir runs/demo/cluster \
      --config.teacher.workdir=runs/demo/teacher

256 cosine codes of the teacher's width (96) on its 8x8 grid; only the codebook trains (Adam on the
codebook loss, constant LR) with CVQ-VAE dead-code replacement. Under a minute on 2 CPU cores (the
teacher forward dominates). `teacher.kind` picks any teacher (in_the_box_vit / _mae / _clip / _dino).
Upstream recipe (ImageNet, CLIP ViT-B/16 without projection): configs/imagenet/cluster_clip.py.
"""

import ml_collections

from vqkd_jax.config import parse_arg, training_config
from vqkd_jax.train.optimizers import optimizer_config


def get_config(arg=None):
  arg = parse_arg(arg, runlocal=False, image_size=32)
  c = training_config("cluster", total_steps=8 if arg.runlocal else 300, batch_size=64)
  c.data.image_size = arg.image_size
  c.data.name = "shapes_small" if arg.runlocal else "shapes"
  c.teacher = ml_collections.ConfigDict(dict(kind="in_the_box_vit", workdir=""))
  c.model = ml_collections.ConfigDict(dict(num_codes=256, anchor_ema=0.99))
  c.optimizer = optimizer_config(name="adam", lr=1e-2, b1=0.5, b2=0.9, schedule="constant")
  c.log_every = 4 if arg.runlocal else 100
  c.eval_every = c.total_steps
  c.checkpoint_every = c.total_steps
  return c
