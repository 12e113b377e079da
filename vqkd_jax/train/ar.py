"""Stage d: a class-conditional autoregressive transformer over [class] + image tokens.

Image tokens come from the frozen tokenizer on the fly, or from a pre-tokenised directory
(config.data.tokens_dir, written by `vqkd data pretokenize`). Vocabulary (upstream §5.1): classes
[0, C), the null class C (class dropout, p = config.class_dropout, for classifier-free guidance),
image token t -> C + 1 + t. Loss: next-token cross-entropy over the full vocabulary.

config.init_from (optional, gpt2 flavour): a local Hugging Face GPT-2 folder (config.json +
model.safetensors) whose weights replace the initial parameters (proposal/gpt2_checkpoint.py;
upstream starts from GPT-2 medium). Applied once at initialisation, not when resuming.

Without a tokenizer (config.tokenizer_workdir empty), config.data.synthetic with a `bench` group
(grid, codebook_size) trains on uniformly random codes of that grid and codebook, drawn in the loss
(`vqkd bench train` timing with random weights; nothing is learnt).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from vqkd_jax.config import ConfigError
from vqkd_jax.proposal import ar as ar_lib
from vqkd_jax.tokenizers.frozen import load_frozen_tokenizer
from vqkd_jax.train.common import compute_dtype, variables
from vqkd_jax.train.objective import EvalContext, Objective


def build_model(model_cfg, *, num_classes: int, codebook_size: int, num_image_tokens: int,
                precision: str = "float32", grid: tuple[int, int] | None = None
                ) -> ar_lib.ARTransformer:
  """The ARTransformer of config.model over [class] + num_image_tokens image tokens. `grid` (h, w)
  of the image tokens is what rope="2d" rotates by (default: square)."""
  return ar_lib.ARTransformer(vocab_size=num_classes + 1 + codebook_size,
                              seq_len=1 + num_image_tokens,
                              **transformer_fields(model_cfg, num_image_tokens, grid),
                              dtype=compute_dtype(precision))


def transformer_fields(model_cfg, num_image_tokens: int,
                       grid: tuple[int, int] | None = None) -> dict:
  """config.model's ARTransformer fields; with rope="2d" the `grid` (h, w) of the image tokens
  (the config's own, else `grid`, else square) as a tuple of ints."""
  fields = dict(model_cfg)
  if fields.get("rope") == "2d":
    side = math.isqrt(num_image_tokens)
    h, w = fields.get("grid") or grid or (side, side)
    if h * w != num_image_tokens:
      raise ValueError(f"{num_image_tokens} image tokens are not a {h}x{w} grid")
    fields["grid"] = (int(h), int(w))     # a tuple: the model is hashed as a static argument
  return fields


def make_objective(config, *, workdir: str, axis_name: str | None) -> Objective:
  num_classes = config.data.num_classes
  if config.tokenizer_workdir:
    tokenizer = load_frozen_tokenizer(config.tokenizer_workdir, config.precision)
    h, w = tokenizer.grid(config.data.image_size)
    codebook_size, frozen = tokenizer.num_codes, {"tokenizer": tokenizer.variables}

    def image_tokens(frozen, images_uint8, rng):
      del rng
      idx = tokenizer.encode(frozen["tokenizer"], images_uint8)
      return idx.reshape(idx.shape[0], -1)
  elif config.data.synthetic and config.get("bench"):
    h = w = config.bench.grid
    codebook_size, frozen = config.bench.codebook_size, None

    def image_tokens(frozen, images_uint8, rng):
      del frozen
      return jax.random.randint(rng, (images_uint8.shape[0], h * w), 0, codebook_size, jnp.int32)
  else:
    raise ConfigError("the AR stage reads image tokens from a trained tokenizer: set "
                      "config.tokenizer_workdir (or, for `vqkd bench train`, data.synthetic with a "
                      "bench group: grid, codebook_size)")
  model = build_model(config.model, num_classes=num_classes, codebook_size=codebook_size,
                      num_image_tokens=h * w, precision=config.precision, grid=(h, w))

  def init(rng, batch):
    return model.init(rng, jnp.zeros((batch["image"].shape[0], 1 + h * w), jnp.int32), train=False)

  init_params = None
  if config.get("init_from"):
    from vqkd_jax.proposal.gpt2_checkpoint import gpt2_initializer
    if model.flavour != "gpt2":
      raise ConfigError(f"config.init_from reads a GPT-2 checkpoint; model.flavour is "
                        f"{model.flavour!r}")
    init_params = gpt2_initializer(config.init_from, model)

  if config.data.get("tokens_dir"):
    from vqkd_jax.data.pretokenize import read_metadata
    meta = read_metadata(config.data.tokens_dir)
    if meta["num_codes"] != codebook_size or tuple(meta["grid"]) != (h, w):
      raise ValueError(f"{config.data.tokens_dir} holds codes of {meta['num_codes']} on a "
                       f"{meta['grid']} grid; the tokenizer in {config.tokenizer_workdir} has "
                       f"{codebook_size} on {[h, w]}")

  def loss(params, model_state, frozen, batch, rng, train):
    tokens = (batch["tokens"] if "tokens" in batch
              else image_tokens(frozen, batch["image"], jax.random.fold_in(rng, 2)))
    seq = ar_lib.make_sequence(batch["label"], tokens, num_classes,
                               config.class_dropout if train else 0.0, rng)
    logits = model.apply(variables(params, model_state), seq, train=train,
                         rngs={"dropout": jax.random.fold_in(rng, 1)})
    ce = ar_lib.next_token_loss(logits, seq)
    return ce, ({"ce": ce, "perplexity": jnp.exp(ce)}, model_state)

  def evaluate(ctx: EvalContext) -> dict:
    return {"perplexity": validation_perplexity(
        config, model, variables(ctx.params, ctx.model_state),
        lambda images: image_tokens(ctx.frozen, images, jax.random.PRNGKey(1)), num_classes)}

  return Objective(init=init, loss=loss, frozen=frozen, evaluate=evaluate, init_params=init_params)


def validation_perplexity(config, model, model_vars, tokens_fn, num_classes: int,
                          limit: int | None = None) -> float:
  """exp(mean cross-entropy of the image tokens of the validation split, teacher-forced with the
  true class): the paper's PPL. `limit`: the split's first that many images only."""
  from vqkd_jax.train.evaluate import map_split

  @jax.jit
  def fn(batch):
    seq = ar_lib.make_sequence(batch["label"], tokens_fn(batch["image"]), num_classes, 0.0,
                               jax.random.PRNGKey(0))
    logits = model.apply(model_vars, seq, train=False).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    nll = -jnp.take_along_axis(logp, seq[:, 1:, None], axis=-1)[..., 0]
    return {"nll_sum": nll.sum(-1), "count": jnp.full(nll.shape[:1], nll.shape[1])}

  res = map_split(config, fn, limit=limit)
  return float(np.exp(res["nll_sum"].sum() / res["count"].sum()))


def load_ar(workdir: str, precision: str = "float32", tokenizer=None):
  """(module, variables, info) of a trained AR stage; info has num_classes, codebook_size, grid,
  tokenizer_workdir and tokenizer (the FrozenTokenizer, loaded once). `tokenizer`: a
  FrozenTokenizer or work directory to use instead of the config's tokenizer_workdir."""
  from vqkd_jax.train.loop import load_trained

  trained = load_trained(workdir)
  cfg = trained["config"]
  if tokenizer is None or isinstance(tokenizer, str):
    tokenizer = load_frozen_tokenizer(tokenizer or cfg["tokenizer_workdir"], precision)
  h, w = tokenizer.grid(cfg["data"]["image_size"])
  info = {"num_classes": cfg["data"]["num_classes"], "codebook_size": tokenizer.num_codes,
          "grid": (h, w), "tokenizer_workdir": cfg["tokenizer_workdir"], "tokenizer": tokenizer}
  model = build_model(cfg["model"], num_classes=info["num_classes"],
                      codebook_size=info["codebook_size"], num_image_tokens=h * w,
                      precision=precision, grid=(h, w))
  return model, variables(trained["params"], trained["model_state"]), info
