"""In-the-box CLIP-style teacher on the built-in dataset (a caption-supervised teacher row).

  vqkd train --config configs/demo/teacher_clip.py --workdir runs/demo/teacher_clip

Image tower: a ViT with a convolutional stem; text tower: a 2-block causal transformer over the
captions ("a large red triangle at the top left", tokenised with the grammar's 19 words); CLIP's
in-batch InfoNCE with a learned temperature. About 1.5 minutes on 2 CPU cores. Distil it with
`--config.teacher.kind=in_the_box_clip --config.teacher.workdir=runs/demo/teacher_clip`.
Expected (the stage's eval/*): patch tokens that stay distinct (eval/token_similarity about
0.5-0.65, the supervised teacher's 0.87), zero-shot caption retrieval that gets the place mostly
right (eval/zero_shot_cell_accuracy about 0.8) and colour and shape about half the time.
`:runlocal` trains a 1-block model a few steps only (tests).
"""

import ml_collections

from vqkd_jax.config import parse_arg, training_config
from vqkd_jax.train.optimizers import optimizer_config


def get_config(arg=None):
  arg = parse_arg(arg, runlocal=False, image_size=32)
  c = training_config("teacher_clip", total_steps=6 if arg.runlocal else 500, batch_size=64)
  c.data.image_size = arg.image_size
  c.data.name = "shapes_small" if arg.runlocal else "shapes"
  c.model = ml_collections.ConfigDict(dict(
      image_size=arg.image_size, patch_size=4, width=96, depth=1 if arg.runlocal else 4,
      num_heads=4, embed_dim=96, text_width=64, text_depth=2, text_heads=4, context_length=12,
      conv_stem=True, init_temperature=0.07,
      pos_init_std=0.2))  # Places learnt in 500 steps (see train/teacher_clip.py).
  c.optimizer = optimizer_config(lr=1e-3, b2=0.98, eps=1e-6, weight_decay=0.1, warmup_steps=50,
                                 end_lr=1e-5)
  c.log_every = 3 if arg.runlocal else 100
  c.eval_every = c.total_steps
  c.checkpoint_every = c.total_steps
  return c
