"""Stage b: a VQ-KD tokenizer distilled from a frozen teacher's last-layer patch tokens.

loss = mean(1 - cos(feature_decoder(codes), teacher_tokens)) + commitment (normalised, weight 1),
with the cosine codebook updated by EMA (summed across devices) after a spherical k-means init on the
first global batch (upstream §3.5).

config.teacher.center_targets subtracts the batch's mean teacher token from the targets (off in the
upstream recipe). The in-the-box teacher's tokens share a large common component (most patches are
background: mean cosine similarity ~0.87), so predicting the mean token already reaches a distillation
loss of ~0.17; without centring, the demo tokenizer then collapsed to one code within 20 steps
(measured at lr 1e-3 and 2e-4). Centring makes the differences between tokens the target.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vqkd_jax import quantizers
from vqkd_jax.teachers.load import load_teacher
from vqkd_jax.tokenizers.vqkd import VQKDTokenizer, cosine_distillation_loss
from vqkd_jax.train.common import compute_dtype, to_unit_range, variables
from vqkd_jax.train.objective import EvalContext, Objective


def build_model(model_cfg, precision: str = "float32", axis_name: str | None = None) -> VQKDTokenizer:
  """The tokenizer module from the config's `model` group (plain arguments)."""
  return VQKDTokenizer(**dict(model_cfg), dtype=compute_dtype(precision), axis_name=axis_name)


def make_objective(config, *, workdir: str, axis_name: str | None) -> Objective:
  model = build_model(config.model, config.precision, axis_name)
  teacher = load_teacher(config.teacher, precision=config.precision)
  if teacher.dim != config.model.teacher_dim:
    raise ValueError(f"teacher {config.teacher.kind!r} gives {teacher.dim}-d tokens but "
                     f"model.teacher_dim is {config.model.teacher_dim}: set "
                     f"--config.model.teacher_dim={teacher.dim}")

  def init(rng, batch):
    return model.init({"params": rng, "codebook": rng}, to_unit_range(batch["image"]), train=False)

  center = config.teacher.center_targets

  def targets(teacher_vars, images):
    t = jax.lax.stop_gradient(teacher.tokens(teacher_vars, images))
    if center:  # Subtract the batch's mean token (global: under pmap averaged across devices).
      mean = jnp.mean(t, axis=(0, 1), keepdims=True)
      t = t - (jax.lax.pmean(mean, axis_name) if axis_name else mean)
    return t

  def loss(params, model_state, frozen, batch, rng, train):
    target = targets(frozen["teacher"], batch["image"])
    out, new_state = model.apply(variables(params, model_state), to_unit_range(batch["image"]),
                                 train=train, mutable=["codebook"], rngs={"codebook": rng})
    distill = cosine_distillation_loss(out["features_pred"], target)
    total = distill + out["commitment_loss"]
    metrics = {"distill_loss": distill, "commitment_loss": out["commitment_loss"],
               "codebook_usage": quantizers.codebook_usage(out["usage_counts"])}
    return total, (metrics, new_state)

  def evaluate(ctx: EvalContext) -> dict:
    from vqkd_jax.evaluation import metrics as metrics_lib
    from vqkd_jax.train.evaluate import map_split

    @jax.jit
    def fn(batch):
      target = targets(ctx.frozen["teacher"], batch["image"])
      out = model.apply(variables(ctx.params, ctx.model_state), to_unit_range(batch["image"]),
                        train=False)
      cos = jnp.mean(1 - _cos(out["features_pred"], target), axis=-1)
      return {"indices": out["indices"].reshape(out["indices"].shape[0], -1), "distill": cos}

    res = map_split(config, fn)
    counts = np.bincount(res["indices"].ravel(), minlength=config.model.num_codes)
    return {"distill_loss": float(res["distill"].mean()),
            "codebook_usage": metrics_lib.codebook_usage(counts),
            "code_perplexity": metrics_lib.code_perplexity(counts)}

  return Objective(init=init, loss=loss, frozen={"teacher": teacher.variables}, evaluate=evaluate)


def _cos(a, b):
  a = a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), 1e-6)
  b = b / jnp.maximum(jnp.linalg.norm(b, axis=-1, keepdims=True), 1e-6)
  return jnp.sum(a * b, axis=-1)


def frozen_tokenizer(trained: dict, precision: str = "float32"):
  """The trained tokenizer (`loop.load_trained` output) as a FrozenTokenizer: codes are the
  l2-normalised codebook vectors."""
  from vqkd_jax.tokenizers.frozen import FrozenTokenizer

  cfg = trained["config"]
  model = build_model(cfg["model"], precision)
  return FrozenTokenizer(
      stage="vqkd", num_codes=model.num_codes, code_dim=model.code_dim,
      variables=variables(trained["params"], trained["model_state"]),
      encode=lambda v, x: model.apply(v, to_unit_range(x), method="encode"),
      lookup=lambda v, idx: model.apply(v, idx, method="lookup"),
      image_size=cfg["data"]["image_size"])
