"""Stage "nar": a class-conditional masked-token (MaskGIT / MAGE style) transformer over [class] +
image tokens, decoded in a few parallel steps (proposal/nar.py).

Image tokens come from the frozen tokenizer on the fly, or from a pre-tokenised directory
(config.data.tokens_dir, written by `vqkd data pretokenize`). Per example a cosine-schedule share of
the image tokens is replaced by [MASK]; the class token becomes the null class with probability
config.class_dropout (classifier-free guidance). Loss: cross-entropy on the masked positions only
(label smoothing config.label_smoothing). Validation: accuracy and perplexity of the masked tokens
(true class, masks of the training distribution drawn with a fixed key).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vqkd_jax.proposal import nar as nar_lib
from vqkd_jax.tokenizers.frozen import load_frozen_tokenizer
from vqkd_jax.train.common import compute_dtype, variables
from vqkd_jax.train.objective import EvalContext, Objective


def build_model(model_cfg, *, num_classes: int, codebook_size: int, num_image_tokens: int,
                precision: str = "float32") -> nar_lib.NARTransformer:
  return nar_lib.NARTransformer(num_classes=num_classes, codebook_size=codebook_size,
                                seq_len=1 + num_image_tokens, **dict(model_cfg),
                                dtype=compute_dtype(precision))


def make_objective(config, *, workdir: str, axis_name: str | None) -> Objective:
  tokenizer = load_frozen_tokenizer(config.tokenizer_workdir, config.precision)
  h, w = tokenizer.grid(config.data.image_size)
  num_classes, codebook_size = config.data.num_classes, tokenizer.num_codes
  model = build_model(config.model, num_classes=num_classes, codebook_size=codebook_size,
                      num_image_tokens=h * w, precision=config.precision)

  def image_tokens(tok_vars, images_uint8):
    idx = tokenizer.encode(tok_vars, images_uint8)
    return idx.reshape(idx.shape[0], -1)

  def init(rng, batch):
    return model.init(rng, jnp.zeros((batch["image"].shape[0], 1 + h * w), jnp.int32), train=False)

  if config.data.get("tokens_dir"):
    from vqkd_jax.data.pretokenize import read_metadata
    meta = read_metadata(config.data.tokens_dir)
    if meta["num_codes"] != codebook_size or tuple(meta["grid"]) != (h, w):
      raise ValueError(f"{config.data.tokens_dir} holds codes of {meta['num_codes']} on a "
                       f"{meta['grid']} grid; the tokenizer in {config.tokenizer_workdir} has "
                       f"{codebook_size} on {[h, w]}")

  def loss(params, model_state, frozen, batch, rng, train):
    codes = (batch["tokens"] if "tokens" in batch
             else image_tokens(frozen["tokenizer"], batch["image"]))
    codes = codes.reshape(codes.shape[0], -1).astype(jnp.int32)
    r_mask, r_class, r_dropout = jax.random.split(rng, 3)
    mask = nar_lib.random_mask(r_mask, *codes.shape)
    seq = nar_lib.masked_sequence(batch["label"], codes, mask, num_classes, codebook_size,
                                  config.class_dropout if train else 0.0, r_class)
    logits = model.apply(variables(params, model_state), seq, train=train,
                         rngs={"dropout": r_dropout})
    ce, metrics = nar_lib.masked_token_metrics(logits, codes, mask, config.label_smoothing)
    return ce, (metrics, model_state)

  def evaluate(ctx: EvalContext) -> dict:
    return validation_metrics(config, model, variables(ctx.params, ctx.model_state),
                              lambda images: image_tokens(ctx.frozen["tokenizer"], images),
                              num_classes, codebook_size)

  return Objective(init=init, loss=loss, frozen={"tokenizer": tokenizer.variables},
                   evaluate=evaluate)


def validation_metrics(config, model, model_vars, tokens_fn, num_classes: int,
                       codebook_size: int, limit: int | None = None) -> dict:
  """Masked-token accuracy and perplexity (exp of the mean NLL over the masked positions) on the
  validation split, with the true class and cosine-schedule masks drawn from a fixed key per
  batch (the same masks on every evaluation). `limit`: the split's first that many images."""
  from vqkd_jax.train.evaluate import map_split

  @jax.jit
  def fn(batch):
    codes = tokens_fn(batch["image"]).astype(jnp.int32)
    mask = nar_lib.random_mask(jax.random.PRNGKey(0), *codes.shape)
    seq = nar_lib.masked_sequence(batch["label"], codes, mask, num_classes, codebook_size)
    return nar_lib.masked_token_sums(model.apply(model_vars, seq, train=False), codes, mask)

  res = map_split(config, fn, limit=limit)
  count = res["count"].sum()
  return {"masked_accuracy": float(res["correct"].sum() / count),
          "masked_perplexity": float(np.exp(res["nll_sum"].sum() / count))}


def load_nar(workdir: str, precision: str = "float32", tokenizer=None):
  """(module, variables, info) of a trained NAR stage; info has num_classes, codebook_size, grid,
  tokenizer_workdir, tokenizer (the FrozenTokenizer, loaded once) and the config's sampling group
  (steps, cfg_scale, ...) when it has one. `tokenizer`: a FrozenTokenizer or work directory
  to use instead of the config's tokenizer_workdir."""
  from vqkd_jax.train.loop import load_trained

  trained = load_trained(workdir)
  cfg = trained["config"]
  if tokenizer is None or isinstance(tokenizer, str):
    tokenizer = load_frozen_tokenizer(tokenizer or cfg["tokenizer_workdir"], precision)
  h, w = tokenizer.grid(cfg["data"]["image_size"])
  info = {"num_classes": cfg["data"]["num_classes"], "codebook_size": tokenizer.num_codes,
          "grid": (h, w), "tokenizer_workdir": cfg["tokenizer_workdir"], "tokenizer": tokenizer,
          "sampling": dict(cfg.get("sampling") or {})}
  model = build_model(cfg["model"], num_classes=info["num_classes"],
                      codebook_size=info["codebook_size"], num_image_tokens=h * w,
                      precision=precision)
  return model, variables(trained["params"], trained["model_state"]), info
