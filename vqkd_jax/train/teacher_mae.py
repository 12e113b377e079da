"""Stage: the in-the-box MAE-style teacher (teachers/in_the_box_mae.py) on the built-in dataset.

Per step: a random horizontal flip, a random subset of num_visible(N, mask_ratio) visible patches
per image, the loss of masked_patch_loss on the hidden patches (normalised pixels when
`norm_pix_loss`; the demo predicts raw pixels, see its config). No labels are used.
eval/token_similarity and eval/probe_* (train/teacher_probe.py) say whether the unmasked encoder's
patch tokens keep spatial meaning.

config.model: image_size, patch_size, width, depth, num_heads, decoder_width, decoder_depth,
decoder_heads, conv_stem, pos_init_std; config.mask_ratio, config.norm_pix_loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vqkd_jax.teachers.in_the_box_encoder import keep_to_visible
from vqkd_jax.teachers.in_the_box_mae import (MaskedAutoencoder, masked_patch_loss, num_visible,
                                              normalised_patches, patchify, random_keep)
from vqkd_jax.train.common import compute_dtype, to_unit_range, variables
from vqkd_jax.train.objective import EvalContext, Objective


def build_model(model_cfg, precision: str = "float32") -> MaskedAutoencoder:
  return MaskedAutoencoder(**dict(model_cfg), dtype=compute_dtype(precision))


def tokens_fn(model: MaskedAutoencoder, variables_):
  """uint8 images [B, H, W, 3] -> teacher tokens [B, N, width] (unmasked encoder, final norm)."""
  return lambda images: model.apply(variables_, to_unit_range(images),
                                    method=MaskedAutoencoder.tokens)


def frozen_teacher(trained: dict, precision: str = "float32"):
  """(variables, apply_tokens(variables, uint8 images) -> [B, N, width], width) of a finished
  stage (loop.load_trained's dict); the variables hold the encoder only."""
  model = build_model(trained["config"]["model"], precision)
  teacher_vars = {"params": {"encoder": trained["params"]["encoder"]}}
  return teacher_vars, lambda v, images: tokens_fn(model, v)(images), model.width


def make_objective(config, *, workdir: str, axis_name: str | None) -> Objective:
  model = build_model(config.model, config.precision)
  n_patches = model.num_patches
  n_keep = num_visible(n_patches, config.mask_ratio)

  def init(rng, batch):
    images = to_unit_range(batch["image"])
    keep = random_keep(rng, images.shape[0], n_patches, n_keep)
    return model.init(rng, images, keep)

  def loss(params, model_state, frozen, batch, rng, train):
    flip_rng, mask_rng = jax.random.split(rng)
    images = to_unit_range(batch["image"])
    flip = jax.random.bernoulli(flip_rng, 0.5, (images.shape[0],))
    images = jnp.where(flip[:, None, None, None], images[:, :, ::-1], images)
    keep = random_keep(mask_rng, images.shape[0], n_patches, n_keep)
    pred = model.apply(variables(params, model_state), images, keep)["pred"]
    target = patchify(images, config.model.patch_size)
    if config.norm_pix_loss:
      target = normalised_patches(target)
    hidden = 1.0 - keep_to_visible(keep, n_patches)
    mse = masked_patch_loss(pred, target, hidden)
    return mse, ({"masked_mse": mse}, model_state)

  def evaluate(ctx: EvalContext) -> dict:
    from vqkd_jax.train.teacher_probe import evaluate_tokens

    return evaluate_tokens(config, tokens_fn(model, variables(ctx.params, ctx.model_state)))

  return Objective(init=init, loss=loss, evaluate=evaluate)
