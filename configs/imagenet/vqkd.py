"""VQ-KD on ImageNet-1k with the upstream recipe (upstream §3.5, §7): ViT-B/16 student at 224,
8192 cosine codes of dim 32, one-block feature decoder to the teacher's width, AdamW 2e-4
(0.9, 0.99), wd 1e-4 (selective), 25k linear warmup from 1e-8x then cosine to 1e-5, 250k steps,
global batch 512, `default` augmentation (RandomResizedCrop 0.08-1 + flip), bf16.

  vqkd train --config configs/imagenet/vqkd.py:teacher=clip --workdir runs/in1k/vqkd_clip \
      --config.data.data_dir=$TFDS_DIR --config.teacher.path=/ckpt/clip-vit-base-patch16

teacher: clip (openai/clip-vit-base-patch16, projected 512-d tokens), vit (google/vit-base-patch16-
224, 768), dino (facebook/dino-vitb16, 768), mae (facebook/vit-mae-base, 768), and beyond the paper
dinov2 (facebook/dinov2-base, patch 14: its input is resized to 196 for the 14x14 grid) and siglip (google/siglip-base-patch16-224, 768). `path` is a local Hugging Face folder or a hub id
(fetched when online). `teacher=random` uses a CLIP-ViT-B/16-sized ViT with random weights: the
benchmark (`vqkd bench train --config configs/imagenet/vqkd.py:teacher=random`), no download.
About 151 GFLOP per image (student forward + backward, teacher forward). Expected (paper, CLIP):
codebook usage 100%, PPL ~ 100 on ImageNet-trained AR.
"""

import ml_collections

from vqkd_jax.config import parse_arg, training_config
from vqkd_jax.train.optimizers import optimizer_config

# teacher -> (kind, default hub id, token width)
TEACHERS = {
    "clip": ("clip", "openai/clip-vit-base-patch16", 512),
    "vit": ("vit", "google/vit-base-patch16-224", 768),
    "dino": ("dino", "facebook/dino-vitb16", 768),
    "mae": ("mae", "facebook/vit-mae-base", 768),
    "dinov2": ("dinov2", "facebook/dinov2-base", 768),
    "siglip": ("siglip", "google/siglip-base-patch16-224", 768),
    "random": ("random_vit", "", 512),
}


def get_config(arg=None):
  arg = parse_arg(arg, teacher="clip", runlocal=False)
  if arg.teacher not in TEACHERS:
    raise ValueError(f"teacher must be one of {sorted(TEACHERS)}, got {arg.teacher!r}")
  kind, path, dim = TEACHERS[arg.teacher]
  c = training_config("vqkd", total_steps=250_000, batch_size=512, precision="bfloat16")
  c.data.name = "imagenet2012"
  c.data.image_size = 224
  c.data.augmentation = "default"
  c.data.num_classes = 1000
  if kind == "random_vit":
    c.teacher = ml_collections.ConfigDict(dict(
        kind=kind, patch_size=16, width=768, depth=12, num_heads=12, image_size=224, out_dim=dim,
        center_targets=False))
  else:
    # DINOv2's patch 14: 196 px gives the student's 14 x 14 grid (upstream: input = 14 x patch).
    c.teacher = ml_collections.ConfigDict(dict(kind=kind, path=path,
                                                image_size=196 if kind == "dinov2" else 224,
                                                center_targets=False))
  c.model = ml_collections.ConfigDict(dict(
      image_size=224, patch_size=16, width=768, depth=12, num_heads=12, num_codes=8192,
      code_dim=32, decoder_width=768, decoder_depth=1, decoder_heads=12, teacher_dim=dim,
      approximate_gelu=False))
  c.optimizer = optimizer_config(lr=2e-4, b1=0.9, b2=0.99, eps=1e-8, weight_decay=1e-4,
                                 schedule="warmup_cosine", warmup_steps=25_000,
                                 warmup_init_factor=1e-8, end_lr=1e-5, decay="weights")
  c.parallel.strategy = "fsdp"
  c.log_every = 100
  c.eval_every = 10_000
  c.checkpoint_every = 10_000
  if arg.runlocal:
    c.total_steps, c.batch_size, c.data.synthetic = 2, 8, True
    c.log_every = c.checkpoint_every = 1
    c.eval_every = 0
  return c
