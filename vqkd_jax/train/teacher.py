"""Stage a: the in-the-box supervised ViT teacher.

A ViT (convolutional stem) trained on the built-in dataset with two cross-entropies: on its pooled
class logits, and on per-patch logits against the dataset's segmentation (a patch mostly covered by
the object -> the object's class, otherwise "background"). The dense term keeps the patch tokens
spatially meaningful: trained on the pooled logits alone, or with every patch predicting the image's
class, the tokens of an image become nearly identical (measured: mean cosine similarity 0.975), a
useless distillation target (`miniature-study.md`). eval/token_similarity reports this.
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


def patch_targets(segmentation: jax.Array, grid: int, num_classes: int) -> jax.Array:
  """Per-patch labels [B, grid*grid] from a segmentation [B, H, W] (0 = background, c + 1 = class c):
  the class where the object covers at least half of the patch, else num_classes (background)."""
  b, h, w = segmentation.shape
  obj = (segmentation > 0).astype(jnp.float32).reshape(b, grid, h // grid, grid, w // grid)
  cover = obj.mean(axis=(2, 4)).reshape(b, grid * grid)
  cls = jnp.max(segmentation.reshape(b, -1), axis=-1).astype(jnp.int32) - 1
  return jnp.where(cover >= 0.5, cls[:, None], num_classes)


def classification_losses(out: dict, labels: jax.Array, patch_labels: jax.Array,
                          patch_weight: float):
  """(total loss, metrics) from pooled logits [B, C] and per-patch logits [B, N, C + 1]."""
  ce = optax.softmax_cross_entropy_with_integer_labels(out["logits"].astype(jnp.float32), labels)
  patch_logits = out["patch_logits"].astype(jnp.float32)
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

  grid = config.model.image_size // config.model.patch_size

  def loss(params, model_state, frozen, batch, rng, train):
    images, seg = to_unit_range(batch["image"]), batch["segmentation"]
    flip = jax.random.bernoulli(rng, 0.5, (images.shape[0],))
    images = jnp.where(flip[:, None, None, None], images[:, :, ::-1], images)
    seg = jnp.where(flip[:, None, None], seg[:, :, ::-1], seg)  # Flips keep the classes.
    out = model.apply(variables(params, model_state), images, train=train,
                      rngs={"dropout": rng})
    targets = patch_targets(seg, grid, config.model.num_classes)
    total, metrics = classification_losses(out, batch["label"], targets, config.patch_loss_weight)
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
