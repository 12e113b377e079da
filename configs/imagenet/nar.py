"""Class-conditional masked-token (MaskGIT / MAGE style) transformer on ImageNet-1k tokens at
256 px: [class] + 16x16 = 256 image tokens from the frozen tokenizer (8192 codes), bidirectional
attention, cosine-schedule masking, loss on the masked tokens only, class dropout 0.1 for
classifier-free guidance, parallel decoding in 8 steps.

  vqkd train --config configs/imagenet/nar.py --workdir runs/in1k/nar \
      --config.data.data_dir=$TFDS_DIR --config.tokenizer_workdir=runs/in1k/vqkd_clip
  vqkd bench sample --config configs/imagenet/nar.py     # random weights, no tokenizer needed

Size: upstream §5.6's MAGE-B copy is a 12 + 8 layer, 768-wide encoder-decoder; here one 24-layer,
768-wide, 16-head stack (MaskGIT's class-conditional transformer; about 183M parameters), MLP 4x,
LayerNorm eps 1e-6, dropout 0.1, label smoothing 0.1 (MAGE). The upstream repository has no NAR
training recipe; this one follows the MaskGIT paper's as far as it is stated [unverified]: AdamW
(0.9, 0.96), lr 1e-4 after a 5k-step warmup, cosine decay, weight decay 0.045, batch 256, `weak`
augmentation as the upstream AR stage. 250k steps (50 epochs; MaskGIT trained 300). bf16.
"""

import ml_collections

from vqkd_jax.config import parse_arg, training_config
from vqkd_jax.train.optimizers import optimizer_config


def get_config(arg=None):
  arg = parse_arg(arg, runlocal=False)
  c = training_config("nar", total_steps=250_000, batch_size=256, precision="bfloat16")
  c.data.name = "imagenet2012"
  c.data.image_size = 256
  c.data.augmentation = "weak"
  c.data.num_classes = 1000
  c.tokenizer_workdir = ""
  c.class_dropout = 0.1
  c.label_smoothing = 0.1
  c.model = ml_collections.ConfigDict(dict(
      width=768, depth=24, num_heads=16, mlp_ratio=4.0, dropout=0.1, attention="auto",
      remat=False))
  c.sampling = ml_collections.ConfigDict(dict(
      steps=8, cfg_scale=1.75, cfg_schedule="constant", temperature=1.0, choice_temperature=4.5))
  # `vqkd bench sample`: random weights at this size, no tokenizer.
  c.bench = ml_collections.ConfigDict(dict(grid=16, codebook_size=8192, batch_size=64))
  c.optimizer = optimizer_config(lr=1e-4, b1=0.9, b2=0.96, eps=1e-8, weight_decay=0.045,
                                 schedule="warmup_cosine", warmup_steps=5000, end_lr=0.0,
                                 decay="weights")
  c.parallel.strategy = "fsdp"
  c.log_every = 100
  c.eval_every = 10_000
  c.checkpoint_every = 10_000
  if arg.runlocal:
    c.total_steps, c.batch_size, c.data.synthetic = 2, 8, True
    c.log_every = c.checkpoint_every = 1
    c.eval_every = 0
  return c
