"""Class-conditional AR prior on ImageNet-1k tokens at 256 px (upstream §5.1-5.4): [class] +
16x16 = 256 image tokens from the frozen tokenizer (8192 codes), vocabulary 1000 classes + the null
class + 8192 codes = 9193, class dropout 0.1 (classifier-free guidance), next-token cross-entropy
over the full vocabulary.

  vqkd train --config configs/imagenet/ar.py:variant=gpt2 --workdir runs/in1k/ar_gpt2 \
      --config.data.data_dir=$TFDS_DIR --config.tokenizer_workdir=runs/in1k/vqkd_clip \
      --config.init_from=pretrained/huggingface/gpt2-medium
  vqkd train --config configs/imagenet/ar.py:variant=llama --workdir runs/in1k/ar_llama ...
  vqkd bench train --config configs/imagenet/ar.py --config.data.synthetic=True
  vqkd bench sample --config configs/imagenet/ar.py:variant=llama   # random weights, no tokenizer

Variants (`variant=`):
  gpt2   GPT-2 medium: 24 layers, width 1024, 16 heads, MLP 4096, learned positions, LayerNorm eps
         1e-5, gelu_new, dropout 0.1 (embeddings, residuals, attention probabilities), head tied
         to the token embedding; initialised from a Hugging Face GPT-2 folder (config.json +
         model.safetensors) when config.init_from names one, as upstream starts from GPT-2 medium
         (first 9193 rows of its token embedding, first 257 positions).
  llama  Llama medium: 24 layers, width 1024, 16 heads (no KV grouping), SwiGLU MLP 2816, RMSNorm
         eps 1e-5, rotary positions theta 1e4 (`rope=2d`: LlamaGen's 2-D RoPE over the 16x16
         grid; default 1d, as upstream's HF Llama), no biases, no dropout, untied head initialised
         to zero.
`runlocal`: a 2-layer, 64-wide model on random tokens of a 4x4 grid, two steps; seconds on a CPU.

Recipe (upstream §5.4): AdamW lr 1e-4, betas (0.9, 0.98), eps 1e-6, weight decay 0.2 on every
parameter, cosine decay to 0 over 260k steps without warmup, global batch 96, `weak` augmentation,
bf16. Sampling (§5.3): CFG scale 1.75 on logits, temperature 1, top-k 600, top-p 0.92.
Time and result: not yet run at this size [unverified]; the paper reports 4.10 generation FID for
VQ-KD_CLIP tokens (upstream.md §9).
"""

import ml_collections

from vqkd_jax.config import ConfigError, parse_arg, training_config
from vqkd_jax.train.optimizers import optimizer_config

VARIANTS = ("gpt2", "llama")


def model_config(variant: str, rope: str = "1d") -> ml_collections.ConfigDict:
  """The transformer of `variant` at upstream's medium size."""
  if variant == "gpt2":
    return ml_collections.ConfigDict(dict(
        flavour="gpt2", width=1024, depth=24, num_heads=16, mlp_ratio=4.0, norm_eps=1e-5,
        dropout=0.1, tie_embeddings=True, attention="auto", decode_step="auto",
        remat=False))
  if variant == "llama":
    return ml_collections.ConfigDict(dict(
        flavour="llama", width=1024, depth=24, num_heads=16, mlp_dim=2816, norm_eps=1e-5,
        rope_theta=10000.0, rope=rope, dropout=0.0, tie_embeddings=False, attention="auto",
        decode_step="auto", remat=False))
  raise ConfigError(f"unknown variant {variant!r}: one of {', '.join(VARIANTS)}")


def get_config(arg=None):
  arg = parse_arg(arg, runlocal=False, variant="gpt2", rope="1d")
  c = training_config("ar", total_steps=260_000, batch_size=96, precision="bfloat16")
  c.data.name = "imagenet2012"
  c.data.image_size = 256
  c.data.augmentation = "weak"
  c.data.num_classes = 1000
  c.tokenizer_workdir = ""
  c.init_from = ""        # gpt2: a Hugging Face GPT-2 folder (pretrained/huggingface/gpt2-medium)
  c.class_dropout = 0.1
  c.model = model_config(arg.variant, arg.rope)
  c.sampling = ml_collections.ConfigDict(dict(
      cfg_scale=1.75, temperature=1.0, top_k=600, top_p=0.92))
  # `vqkd bench sample` / `bench train --config.data.synthetic=True`: random weights at this size
  # and random codes of this grid and codebook, no tokenizer; `bench sample` times each layout of
  # the decoding kernels (proposal/sampling.DECODE_KERNELS) with each way of running a decoding
  # step (model.decode_step: the Pallas kernels, XLA's ops) and of drawing a token
  # (sampling.DRAWS; "auto": the kernel on GPUs). To compare the default (norm2 folded) with the
  # unfolded layout, and both draws: --config.bench.decode_kernels='("folded","fused_cublas")'
  # --config.bench.draw='("xla","pallas")'
  c.bench = ml_collections.ConfigDict(dict(grid=16, codebook_size=8192, decode_kernels=(
      "separate", "fused", "fused_cublas", "folded"), decode_step=("pallas", "xla"),
      draw=("auto",)))
  c.optimizer = optimizer_config(lr=1e-4, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.2,
                                 schedule="cosine", end_lr=0.0, decay="all")
  c.parallel.strategy = "fsdp"
  c.log_every = 100
  c.eval_every = 10_000
  c.checkpoint_every = 10_000
  if arg.runlocal:
    c.total_steps, c.batch_size, c.precision = 2, 8, "float32"
    c.data.synthetic = True
    c.model.update(width=64, depth=2, num_heads=4)
    if arg.variant == "llama":
      c.model.mlp_dim = 176
    c.bench.grid = 4
    c.bench.decode_kernels = ("separate", "fused")
    c.log_every = c.checkpoint_every = 1
    c.eval_every = 0
  return c
