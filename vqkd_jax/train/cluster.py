"""The Cluster tokenizer (upstream §3.7): a frozen image-understanding encoder turned into a
tokenizer by online clustering of its patch tokens.

Tokens = the frozen teacher's last-layer patch tokens at its native grid (CLIP: 768-d post-LN tokens
without the projection, `teacher.with_projection=False`). Quantizer: a cosine-distance codebook of K
codes of the token width, init U(-1/K, 1/K), trained by Adam on the codebook loss
mean((E_q - sg(x))^2) alone, with CVQ-VAE's dead-code replacement by the global nearest features
(EMA 0.99; quantizers.VectorQuantizer(anchors=True), applied after each update).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vqkd_jax import quantizers
from vqkd_jax.teachers.load import load_teacher
from vqkd_jax.train.common import variables
from vqkd_jax.train.objective import EvalContext, Objective


def build_quantizer(model_cfg, token_dim: int, axis_name=None) -> quantizers.VectorQuantizer:
  return quantizers.VectorQuantizer(
      num_codes=model_cfg["num_codes"], code_dim=token_dim, distance="cosine", beta=0.0,
      anchors=True, anchor_ema=model_cfg["anchor_ema"], axis_name=axis_name)


def make_objective(config, *, workdir: str, axis_name: str | None) -> Objective:
  teacher = load_teacher(config.teacher, precision=config.precision)
  quantizer = build_quantizer(config.model, teacher.dim, axis_name)

  def tokens(teacher_vars, images):
    return jax.lax.stop_gradient(teacher.tokens(teacher_vars, images)).astype(jnp.float32)

  def init(rng, batch):
    shape = jax.eval_shape(tokens, teacher.variables, batch["image"]).shape
    return quantizer.init(rng, jnp.zeros(shape, jnp.float32))

  def loss(params, model_state, frozen, batch, rng, train):
    x = tokens(frozen["teacher"], batch["image"])
    out, new_state = quantizer.apply(variables(params, model_state), x, train=train,
                                     mutable=["codebook"])
    metrics = {"codebook_loss": out["codebook_loss"],
               "codebook_usage": quantizers.codebook_usage(out["usage_counts"]),
               "code_perplexity": quantizers.code_perplexity(out["usage_counts"])}
    return out["loss"], (metrics, new_state)

  def evaluate(ctx: EvalContext) -> dict:
    from vqkd_jax.evaluation import metrics as metrics_lib
    from vqkd_jax.train.evaluate import map_split

    @jax.jit
    def fn(batch):
      out = quantizer.apply(variables(ctx.params, ctx.model_state),
                            tokens(ctx.frozen["teacher"], batch["image"]), train=False)
      return {"indices": out["indices"].reshape(out["indices"].shape[0], -1)}

    counts = np.bincount(map_split(config, fn)["indices"].ravel(),
                         minlength=config.model.num_codes)
    return {"codebook_usage": metrics_lib.codebook_usage(counts),
            "code_perplexity": metrics_lib.code_perplexity(counts)}

  return Objective(init=init, loss=loss, frozen={"teacher": teacher.variables}, evaluate=evaluate,
                   after_update=quantizers.apply_anchors)


def frozen_tokenizer(trained: dict, precision: str = "float32"):
  """The trained Cluster tokenizer as a FrozenTokenizer (teacher + codebook; codes are the raw
  codebook vectors, as upstream's pixel decoder reads them)."""
  import ml_collections

  from vqkd_jax.tokenizers.frozen import FrozenTokenizer

  cfg = trained["config"]
  teacher = load_teacher(ml_collections.ConfigDict(cfg["teacher"]), precision=precision)
  quantizer = build_quantizer(cfg["model"], teacher.dim)
  qvars = variables(trained["params"], trained["model_state"])

  def encode(v, images):
    x = teacher.tokens(v["teacher"], images).astype(jnp.float32)
    idx = quantizer.apply(v["quantizer"], x, train=False)["indices"]
    side = int(round(idx.shape[1] ** 0.5))
    return idx.reshape(idx.shape[0], side, idx.shape[1] // side)

  def lookup(v, indices):
    return quantizer.apply(v["quantizer"], indices, method="lookup")

  return FrozenTokenizer(stage="cluster", num_codes=quantizer.num_codes, code_dim=teacher.dim,
                         variables={"teacher": teacher.variables, "quantizer": qvars},
                         encode=encode, lookup=lookup, image_size=cfg["data"]["image_size"])
