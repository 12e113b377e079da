"""Stage a: the in-the-box supervised ViT teacher.

A ViT (convolutional stem) trained on the built-in dataset with two cross-entropies: on its pooled
logits, and on per-patch logits (every patch token must predict the image's class). The per-patch term
keeps the patch tokens spatially meaningful: a classifier trained only on mean-pooled tokens ends with
nearly identical patch tokens, a useless distillation target (`miniature-study.md`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vqkd_jax.teachers.vit import SupervisedViT
from vqkd_jax.train.common import compute_dtype, to_unit_range, variables
from vqkd_jax.train.objective import EvalContext, Objective


def build_model(model_cfg, precision: str = "float32") -> SupervisedViT:
  return SupervisedViT(**dict(model_cfg), dtype=compute_dtype(precision))


def classification_losses(out: dict, labels: jax.Array, patch_weight: float):
  """(total loss, metrics) from pooled and per-patch logits."""
  ce = optax.softmax_cross_entropy_with_integer_labels(out["logits"].astype(jnp.float32), labels)
  patch_logits = out["patch_logits"].astype(jnp.float32)
  patch_labels = jnp.broadcast_to(labels[:, None], patch_logits.shape[:2])
  patch_ce = optax.softmax_cross_entropy_with_integer_labels(patch_logits, patch_labels)
  acc = jnp.mean(jnp.argmax(out["logits"], -1) == labels)
  patch_acc = jnp.mean(jnp.argmax(patch_logits, -1) == patch_labels)
  total = ce.mean() + patch_weight * patch_ce.mean()
  return total, {"ce": ce.mean(), "patch_ce": patch_ce.mean(), "accuracy": acc,
                 "patch_accuracy": patch_acc}


def make_objective(config, *, workdir: str, axis_name: str | None) -> Objective:
  model = build_model(config.model, config.precision)

  def init(rng, batch):
    return model.init(rng, to_unit_range(batch["image"]), train=False)

  def loss(params, model_state, frozen, batch, rng, train):
    images = to_unit_range(batch["image"])
    images = jnp.where(jax.random.bernoulli(rng, 0.5, (images.shape[0], 1, 1, 1)),
                       images[:, :, ::-1], images)  # Horizontal flips keep shape and colour classes.
    out = model.apply(variables(params, model_state), images, train=train,
                      rngs={"dropout": rng})
    total, metrics = classification_losses(out, batch["label"], config.patch_loss_weight)
    return total, (metrics, model_state)

  def evaluate(ctx: EvalContext) -> dict:
    from vqkd_jax.train.evaluate import map_split

    @jax.jit
    def fn(batch):
      out = model.apply(variables(ctx.params, ctx.model_state), to_unit_range(batch["image"]),
                        train=False)
      tokens = out["tokens"]
      tokens = tokens / jnp.linalg.norm(tokens, axis=-1, keepdims=True)
      # Mean cosine similarity between a token and the image's other tokens: near 1 = collapsed.
      sim = jnp.einsum("bnd,bmd->bnm", tokens, tokens).mean(axis=(1, 2))
      return {"correct": jnp.argmax(out["logits"], -1) == batch["label"], "token_similarity": sim}

    res = map_split(config, fn)
    return {"accuracy": float(np.mean(res["correct"])),
            "token_similarity": float(np.mean(res["token_similarity"]))}

  return Objective(init=init, loss=loss, evaluate=evaluate)
