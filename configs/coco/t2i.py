"""Text-to-image AR (or NAR) transformer on MS-COCO 2017 captions at 256 px: a frozen CLIP text
tower's 77 per-token states projected to a prefix (or cross-attended), then 16x16 = 256 image
tokens of the frozen tokenizer (8192 codes), caption dropout 0.1 for classifier-free guidance.

  python -c "from vqkd_jax.data.coco import prepare_coco; prepare_coco('$TFDS_DIR', '$COCO_DIR')"
  vqkd train --config configs/coco/t2i.py --workdir runs/coco/t2i \
      --config.data.data_dir=$TFDS_DIR --config.tokenizer_workdir=runs/in1k/vqkd_clip \
      --config.text_encoder.path=$HF/clip-vit-base-patch16 \
      --config.pixel_decoder_workdir=runs/in1k/pixel_decoder

$COCO_DIR holds annotations/captions_{train,val}2017.json and train2017/, val2017/ (data/coco.py);
the text tower is read from a local Hugging Face CLIP folder (config.json, model.safetensors or
flax_model.msgpack, tokenizer.json or vocab.json + merges.txt): OpenAI's ViT-B/16 CLIP, the
teacher upstream distils, has a 512-wide, 12-layer text tower. `text_encoder=in_the_box` is
accepted too but only knows the built-in captions' words.

Model: GPT-2 medium's shape (24 layers, 1024 wide, 16 heads, learned positions, GELU-tanh,
dropout 0.1, tied output embedding; 312M parameters with the 77 + 256 positions and the
8192-code vocabulary), trained from scratch: upstream starts its GPT-2 from the text-pretrained
checkpoint (§5.2), which has no use for a vocabulary of image codes and is not loaded here.
Recipe (upstream AR, §5.4): AdamW lr 1e-4, betas (0.9, 0.98), eps 1e-6, weight decay 0.2 on all
parameters, cosine to 0 over 260k steps without warmup, batch 96, `weak` augmentation (short side
256, random 256 crop, horizontal flip: captions that say left or right are then wrong for half
the flips; `--config.data.augmentation=none` avoids it). bf16. Sampling: CFG 1.75, top-k 600,
top-p 0.92, temperature 1 (§5.3). No FID protocol for COCO here yet: eval/perplexity (true
captions) and eval/perplexity_null_caption, and a sample grid with its captions.

Variants (`configs/coco/t2i.py:proposal=nar,conditioning=cross_attention`):
  proposal=nar   configs/imagenet/nar.py's masked-token network (24 layers, 768 wide, 16 heads,
                 dropout 0.1, label smoothing 0.1; about 183M parameters plus the text
                 projection) over the caption instead of a class, its optimizer (AdamW (0.9,
                 0.96), lr 1e-4 after 5k warmup steps, cosine, weight decay 0.045) at this
                 config's batch and steps; decoding in 8 steps, CFG 1.75, choice temperature 4.5.
  conditioning=cross_attention   a cross-attention sublayer in every block over the 77 projected
                 caption states (padding masked) instead of the 77-token prefix; the sequence is
                 then a learned start embedding + 256 image tokens. AR decoding computes the
                 caption's keys / values once.
  variant=llama  the Llama flavour of the AR (RMSNorm, SwiGLU, untied head), with `rope=2d`
                 LlamaGen's 2-D RoPE over the 16x16 grid.

Input pipeline: the stage reads batch["caption_ids"] / ["caption_mask"] ([B, 5, 77]: the first 5
captions of each image tokenised by the text tower's tokenizer, data/coco.CaptionTokens), one
drawn per example and step.
"""

import ml_collections

from vqkd_jax.config import parse_arg, training_config
from vqkd_jax.train.optimizers import optimizer_config


def get_config(arg=None):
  arg = parse_arg(arg, runlocal=False, text_encoder="hf_clip", proposal="ar",
                  conditioning="prefix", variant="gpt2", rope="1d")
  c = training_config("t2i", total_steps=260_000, batch_size=96, precision="bfloat16")
  c.data.name = "coco_captions"
  c.data.image_size = 256
  c.data.augmentation = "weak"
  c.data.num_classes = 1
  c.tokenizer_workdir = ""
  c.pixel_decoder_workdir = ""
  c.text_encoder = ml_collections.ConfigDict(dict(kind=arg.text_encoder, path="", workdir=""))
  c.proposal = arg.proposal            # "ar" | "nar"
  c.conditioning = arg.conditioning    # "prefix" | "cross_attention"
  c.caption_dropout = 0.1
  if arg.proposal == "nar":
    c.label_smoothing = 0.1
    c.model = ml_collections.ConfigDict(dict(
        width=768, depth=24, num_heads=16, mlp_ratio=4.0, dropout=0.1, attention="auto",
        remat=False))
    c.sampling = ml_collections.ConfigDict(dict(
        num_samples=16, steps=8, cfg_scale=1.75, cfg_schedule="constant", temperature=1.0,
        choice_temperature=4.5))
    c.optimizer = optimizer_config(lr=1e-4, b1=0.9, b2=0.96, eps=1e-8, weight_decay=0.045,
                                   schedule="warmup_cosine", warmup_steps=5000, end_lr=0.0,
                                   decay="weights")
  else:
    c.model = ml_collections.ConfigDict(dict(
        width=1024, depth=24, num_heads=16, mlp_ratio=4.0, flavour=arg.variant, dropout=0.1,
        tie_embeddings=arg.variant == "gpt2", attention="auto", remat=False, rope=arg.rope))
    if arg.variant == "llama":       # upstream's Llama medium: no dropout, untied
      c.model.dropout = 0.0
    c.sampling = ml_collections.ConfigDict(dict(
        num_samples=16, cfg_scale=1.75, temperature=1.0, top_k=600, top_p=0.92))
    c.optimizer = optimizer_config(lr=1e-4, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.2,
                                   schedule="warmup_cosine", warmup_steps=0, end_lr=0.0,
                                   decay="all")
  c.parallel.strategy = "fsdp"
  c.log_every = 100
  c.eval_every = 10_000
  c.checkpoint_every = 5_000
  if arg.runlocal:
    c.total_steps, c.batch_size = 2, 8
    c.model.width, c.model.depth, c.model.num_heads = 64, 2, 4
    c.log_every = c.checkpoint_every = 1
    c.eval_every = 0
  return c
