"""Stage a': the evaluator network whose features give FD_eval (the demo's stand-in for FID).

A CNN (another architecture than the teacher) trained to classify the built-in images under nuisance
augmentation: random blur (down to smooth, clean backgrounds as a pixel decoder paints them), pixel
noise and colour shifts. It must reach >= 90% validation accuracy before any FD_eval is trusted; the
demo checks this.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vqkd_jax.evaluation.evaluator_net import EvaluatorNet
from vqkd_jax.train.common import compute_dtype, to_unit_range, variables
from vqkd_jax.train.objective import EvalContext, Objective


def build_model(model_cfg, precision: str = "float32") -> EvaluatorNet:
  return EvaluatorNet(**dict(model_cfg), dtype=compute_dtype(precision))


def nuisance_augment(images: jax.Array, rng: jax.Array) -> jax.Array:
  """Random flip, blur (a mix with a 3x3 and 5x5 box blur), noise and per-channel shift, per image.

  images: float [B, H, W, 3] in [-1, 1]."""
  b = images.shape[0]
  k = jax.random.split(rng, 5)
  images = jnp.where(jax.random.bernoulli(k[0], 0.5, (b, 1, 1, 1)), images[:, :, ::-1], images)

  def box(x, r):
    pad = jnp.pad(x, ((0, 0), (r, r), (r, r), (0, 0)), mode="edge")
    kernel = jnp.ones((2 * r + 1, 2 * r + 1, 1, 3), x.dtype) / (2 * r + 1) ** 2
    return jax.lax.conv_general_dilated(pad, kernel, (1, 1), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=3)

  mix = jax.random.uniform(k[1], (b, 1, 1, 1))
  which = jax.random.bernoulli(k[2], 0.5, (b, 1, 1, 1))
  blurred = jnp.where(which, box(images, 1), box(images, 2))
  images = (1 - mix) * images + mix * blurred
  noise_amp = jax.random.uniform(k[3], (b, 1, 1, 1), maxval=0.15)
  images = images + noise_amp * jax.random.normal(k[4], images.shape)
  shift = 0.1 * jax.random.normal(jax.random.fold_in(rng, 7), (b, 1, 1, 3))
  return jnp.clip(images + shift, -1, 1)


def make_objective(config, *, workdir: str, axis_name: str | None) -> Objective:
  model = build_model(config.model, config.precision)

  def init(rng, batch):
    return model.init(rng, to_unit_range(batch["image"]), train=False)

  def loss(params, model_state, frozen, batch, rng, train):
    images = nuisance_augment(to_unit_range(batch["image"]), rng)
    out, new_state = model.apply(variables(params, model_state), images, train=train,
                                 mutable=list(model_state))
    ce = optax.softmax_cross_entropy_with_integer_labels(out["logits"].astype(jnp.float32),
                                                         batch["label"]).mean()
    acc = jnp.mean(jnp.argmax(out["logits"], -1) == batch["label"])
    return ce, ({"ce": ce, "accuracy": acc}, new_state)

  def evaluate(ctx: EvalContext) -> dict:
    from vqkd_jax.train.evaluate import map_split
    predict = make_predict_fn(model, ctx.params, ctx.model_state)
    res = map_split(config, lambda b: dict(predict(b["image"]), label=b["label"]))
    return {"accuracy": float(np.mean(np.argmax(res["logits"], -1) == res["label"]))}

  return Objective(init=init, loss=loss, evaluate=evaluate)


def make_predict_fn(model, params, model_state):
  """A jitted uint8 images [B, H, W, 3] -> {"features" [B, F], "logits" [B, C]}."""
  @jax.jit
  def predict(images):
    out = model.apply(variables(params, model_state), to_unit_range(images), train=False)
    return {"features": out["features"].astype(jnp.float32),
            "logits": out["logits"].astype(jnp.float32)}
  return predict
