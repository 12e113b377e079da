"""Text-to-image prior over tokenizer codes on the built-in data (captions such as "a large red
triangle at the top left"): the caption-conditioned counterpart of configs/demo/ar.py
(`proposal=ar`, the default) or of configs/demo/nar.py (`proposal=nar`).

  vqkd train --config configs/demo/t2i.py --workdir runs/demo/t2i \
      --config.tokenizer_workdir=runs/demo/tokenizer \
      --config.text_encoder.workdir=runs/demo/teacher_clip \
      --config.pixel_decoder_workdir=runs/demo/pixel_decoder

Text encoder: the in-the-box CLIP-style caption tower (configs/demo/teacher_clip.py), frozen, its
12 per-token states projected to a prefix; `text_encoder=hf_clip` (with
--config.text_encoder.path=<folder of a Hugging Face CLIP checkpoint>) uses a CLIP text tower
instead. GPT-2 style, 3 layers, width 128, caption dropout 0.1 (CFG 1.75 when sampling). Evaluation:
eval/perplexity with the true captions vs eval/perplexity_null_caption, and samples_<step>.png /
.txt (real images above samples of their captions; without a pixel decoder the codes go to .npy).
About 4 minutes on 2 (shared) CPU cores, 4.2 steps/s. Measured (demo VQ-KD tokenizer, in-the-box
CLIP tower trained 500 steps): eval/perplexity 4.86 with the captions vs 5.31 with the null prefix
(most of the image-token entropy is the background); samples of "a large red circle at the top
left" etc. get colour and place right. `:runlocal` runs 8 steps on the small data.

Variants (`configs/demo/t2i.py:proposal=nar,conditioning=cross_attention`):
  proposal=nar     the masked-token network of configs/demo/nar.py (4 layers, width 128, its
                   optimizer and 8-step decoding) conditioned on the captions instead of a class;
                   caption dropout 0.1, CFG 1.75.
  conditioning=cross_attention   every block cross-attends to the 12 projected caption states
                   (padding masked) instead of reading them as a prefix; the sequence starts with
                   a learned start embedding (AR or NAR).
  variant=llama    the Llama flavour (AR); with `rope=2d` LlamaGen's 2-D RoPE over the token grid.
  vqkd sample --workdir runs/demo/t2i --prompts "a red circle at the top left;a blue square"
"""

import ml_collections

from vqkd_jax.config import parse_arg, training_config
from vqkd_jax.train.optimizers import optimizer_config


def get_config(arg=None):
  arg = parse_arg(arg, runlocal=False, image_size=32, variant="gpt2", text_encoder="in_the_box",
                  proposal="ar", conditioning="prefix", rope="1d")
  c = training_config("t2i", total_steps=8 if arg.runlocal else 1000, batch_size=64)
  c.data.image_size = arg.image_size
  c.data.name = "shapes_small" if arg.runlocal else "shapes"
  c.tokenizer_workdir = ""
  c.pixel_decoder_workdir = ""   # Needed for VQ-KD / Cluster codes to become pixels in the grid.
  c.text_encoder = ml_collections.ConfigDict(dict(
      kind=arg.text_encoder,  # "in_the_box" (workdir of a teacher_clip stage) | "hf_clip" (path)
      workdir="", path=""))
  # The network, "ar" | "nar", and its conditioning, "prefix" | "cross_attention". Only written
  # when not the defaults (ar, prefix): the default config stays the one that finished demo runs
  # saved (the demo reuses a stage only when its config is unchanged); a saved config without
  # them is an AR prefix model (train/t2i.py).
  if arg.proposal != "ar":
    c.proposal = arg.proposal
  if arg.conditioning != "prefix":
    c.conditioning = arg.conditioning
  c.caption_dropout = 0.1
  num_samples = 8 if arg.runlocal else 16
  if arg.proposal == "nar":            # configs/demo/nar.py's network, decoding and optimizer
    c.label_smoothing = 0.0
    c.model = ml_collections.ConfigDict(dict(width=128, depth=4, num_heads=4, dropout=0.0))
    c.sampling = ml_collections.ConfigDict(dict(
        num_samples=num_samples, steps=8, cfg_scale=1.75, cfg_schedule="constant",
        temperature=1.0, choice_temperature=4.5))
    c.optimizer = optimizer_config(lr=1e-3, b1=0.9, b2=0.96, eps=1e-8, weight_decay=0.05,
                                   warmup_steps=100, end_lr=0.0, decay="weights")
  else:
    c.model = ml_collections.ConfigDict(dict(
        width=128, depth=3, num_heads=4, flavour=arg.variant, dropout=0.0))
    if arg.rope != "1d":
      c.model.rope = arg.rope
    c.sampling = ml_collections.ConfigDict(dict(
        num_samples=num_samples, cfg_scale=1.75, temperature=1.0, top_k=0, top_p=1.0))
    c.optimizer = optimizer_config(lr=1e-3, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.05,
                                   warmup_steps=100, end_lr=0.0, decay="all")
  c.log_every = 4 if arg.runlocal else 100
  c.eval_every = c.total_steps
  c.checkpoint_every = c.total_steps
  return c
