"""In-the-box DINO-style teacher on the built-in dataset (a self-distillation teacher row).

  vqkd train --config configs/demo/teacher_dino.py --workdir runs/demo/teacher_dino

Student and EMA teacher ViTs (convolutional stem), two global views per image, centring and
sharpening, plus iBOT's masked patch-token term to keep the patch tokens spatial. About 1.5 minutes
on 2 CPU cores. Distil it with
`--config.teacher.kind=in_the_box_dino --config.teacher.workdir=runs/demo/teacher_dino` (the EMA
teacher is what is exported). Expected (the stage's eval/*): patch tokens that stay distinct
(eval/token_similarity about 0.55, the supervised teacher's 0.87) but low-level at this budget: the
per-patch probe about as good as a random network's (colour and place, not shape; still so after
1,200 steps).
`:runlocal` trains a 1-block model a few steps only (tests).
"""

import ml_collections

from vqkd_jax.config import parse_arg, training_config
from vqkd_jax.train.optimizers import optimizer_config


def get_config(arg=None):
  arg = parse_arg(arg, runlocal=False, image_size=32)
  c = training_config("teacher_dino", total_steps=6 if arg.runlocal else 400, batch_size=32)
  c.data.image_size = arg.image_size
  c.data.name = "shapes_small" if arg.runlocal else "shapes"
  c.model = ml_collections.ConfigDict(dict(
      image_size=arg.image_size, patch_size=4, width=96, depth=1 if arg.runlocal else 4,
      num_heads=4, num_prototypes=256, head_hidden=256, head_bottleneck=64, conv_stem=True,
      pos_init_std=0.02))
  c.dino = ml_collections.ConfigDict(dict(
      crop_scale=(0.4, 1.0), field_jitter=0.3, noise_jitter=0.08, mask_ratio=0.3,
      patch_loss_weight=1.0, student_temperature=0.1, teacher_temperature=0.04,
      center_momentum=0.9, teacher_momentum=0.99))
  c.optimizer = optimizer_config(lr=1e-3, weight_decay=0.04, warmup_steps=40, end_lr=1e-5,
                                 grad_clip_norm=3.0)
  c.log_every = 3 if arg.runlocal else 50
  c.eval_every = c.total_steps
  c.checkpoint_every = c.total_steps
  return c
