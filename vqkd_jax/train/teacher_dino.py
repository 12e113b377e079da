"""Stage: the in-the-box DINO-style teacher (teachers/in_the_box_dino.py) on the built-in dataset.

Per step, for each image of the batch: two global views (`random_resized_crops`: the law of
data/augment.random_resized_crop_box with area scale `crop_scale`, drawn on the device, bilinear,
plus a horizontal flip; then colour_field_jitter) and a random set of round(mask_ratio * N) hidden
patches per view.
  student: the trained parameters on the masked views; teacher: the EMA parameters
    (model_state["ema_teacher"]) on the unmasked views, no gradient.
  loss = DINO term (CLS, cross-view pairs) + patch_loss_weight * iBOT term (hidden patches, same
    view), teacher outputs centred (model_state["dino_state"] centres, momentum center_momentum)
    and sharpened (teacher_temperature; student_temperature for the student).
  After each optimizer update (Objective.after_update) the teacher moves towards the student with
  the momentum ema_momentum (cosine from `teacher_momentum` to 1 over the run).
No labels are used. Metrics: dino_loss, ibot_loss, teacher_entropy (mean entropy of a teacher
distribution: near 0 = sharp) and teacher_mean_entropy (entropy of the batch-mean distribution:
near 0 = every image on one prototype, i.e. collapse). The exported teacher is the EMA network.

config.model: image_size, patch_size, width, depth, num_heads, num_prototypes, head_hidden,
head_bottleneck, conv_stem, pos_init_std; config.dino: crop_scale, field_jitter, noise_jitter,
mask_ratio, patch_loss_weight, student_temperature, teacher_temperature, center_momentum,
teacher_momentum.

Measured at the demo size (400 steps of 32 images): teacher_mean_entropy about 2.7 (about 15
prototypes in use: no collapse), patch tokens distinct (similarity about 0.54), but the tokens and
the CLS output carry colour and place, not shape (a linear probe of the class from the CLS output:
0.36, from 1,200 steps: 0.38; crops of area 0.7-1 instead of 0.4-1 changed nothing): learning shape
by self-distillation needs more than a few minutes of CPU here.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from vqkd_jax.teachers import in_the_box_dino as dino
from vqkd_jax.teachers.in_the_box_encoder import keep_to_visible
from vqkd_jax.teachers.in_the_box_mae import random_keep
from vqkd_jax.train.common import compute_dtype, to_unit_range
from vqkd_jax.train.objective import EvalContext, Objective


def build_model(model_cfg, precision: str = "float32") -> dino.DinoViT:
  return dino.DinoViT(**dict(model_cfg), dtype=compute_dtype(precision))


def tokens_fn(model: dino.DinoViT, teacher_params):
  """uint8 images [B, H, W, 3] -> teacher tokens [B, N, width] of the network `teacher_params`."""
  return lambda images: model.apply({"params": teacher_params}, to_unit_range(images),
                                    method=dino.DinoViT.tokens)


def frozen_teacher(trained: dict, precision: str = "float32"):
  """(variables, apply_tokens(variables, uint8 images) -> [B, N, width], width) of a finished
  stage (loop.load_trained's dict): the EMA teacher's backbone (model_state["ema_teacher"])."""
  model = build_model(trained["config"]["model"], precision)
  teacher_vars = {"params": {"backbone": trained["model_state"]["ema_teacher"]["backbone"]}}
  return (teacher_vars, lambda v, images: tokens_fn(model, v["params"])(images),
          model.width)


def random_resized_crops(rng: jax.Array, images: jax.Array, scale=(0.4, 1.0),
                         ratio=(3 / 4, 4 / 3), flip: bool = True) -> jax.Array:
  """One random crop per image [B, S, S, C], resized back to S x S (bilinear, antialiased), then a
  horizontal flip with probability 1/2. Crop area ~ U(scale) of the image, log aspect ~ U(log ratio)
  (sides clipped to the image), placed uniformly: torchvision's RandomResizedCrop law, without its
  retries."""
  b, s = images.shape[0], images.shape[1]
  k_area, k_ratio, k_top, k_left, k_flip = jax.random.split(rng, 5)
  area = jax.random.uniform(k_area, (b,), minval=scale[0], maxval=scale[1])
  aspect = jnp.exp(jax.random.uniform(k_ratio, (b,), minval=math.log(ratio[0]),
                                      maxval=math.log(ratio[1])))
  w = jnp.clip(jnp.sqrt(area * aspect), 1.0 / s, 1.0)  # Fractions of the side.
  h = jnp.clip(jnp.sqrt(area / aspect), 1.0 / s, 1.0)
  top = jax.random.uniform(k_top, (b,)) * (1.0 - h)
  left = jax.random.uniform(k_left, (b,)) * (1.0 - w)

  def crop(image, top, left, h, w):
    return jax.image.scale_and_translate(
        image.astype(jnp.float32), image.shape, (0, 1), jnp.stack([1.0 / h, 1.0 / w]),
        jnp.stack([-top * s / h, -left * s / w]), method="linear", antialias=True)

  out = jax.vmap(crop)(images, top, left, h, w)
  if flip:
    mirrored = jax.random.bernoulli(k_flip, 0.5, (b,))
    out = jnp.where(mirrored[:, None, None, None], out[:, :, ::-1], out)
  return out


def colour_field_jitter(rng: jax.Array, images: jax.Array, amplitude: float,
                        noise: float = 0.0, grid: int = 4) -> jax.Array:
  """Adds to each image [B, S, S, 3] in [-1, 1] a smooth random colour field (a grid x grid field of
  U(-amplitude, amplitude) per channel, bilinearly upsampled) and Gaussian pixel noise of std
  `noise`, then clips to [-1, 1]: the built-in dataset's own nuisance (data/shapes.py: colour field,
  noise) drawn anew for each view, DINO's colour jitter for data whose colours are the class."""
  b, s = images.shape[0], images.shape[1]
  k_field, k_noise = jax.random.split(rng)
  field = jax.random.uniform(k_field, (b, grid, grid, 3), minval=-amplitude, maxval=amplitude)
  field = jax.image.resize(field, (b, s, s, 3), "linear")
  out = images + field + noise * jax.random.normal(k_noise, images.shape)
  return jnp.clip(out, -1.0, 1.0)


def make_objective(config, *, workdir: str, axis_name: str | None) -> Objective:
  model = build_model(config.model, config.precision)
  d = config.dino
  n_patches = (config.model.image_size // config.model.patch_size) ** 2
  n_hidden = int(round(d.mask_ratio * n_patches))
  k = config.model.num_prototypes

  def init(rng, batch):
    variables = model.init(rng, to_unit_range(batch["image"]))
    return {"params": variables["params"], "ema_teacher": variables["params"],
            "dino_state": {"center_cls": jnp.zeros((k,), jnp.float32),
                           "center_patch": jnp.zeros((k,), jnp.float32),
                           "updates": jnp.zeros((), jnp.int32)}}

  def loss(params, model_state, frozen, batch, rng, train):
    images = to_unit_range(batch["image"])
    b = images.shape[0]
    rng_views, rng_mask, rng_jitter = jax.random.split(rng, 3)
    views = jnp.concatenate([random_resized_crops(r, images, tuple(d.crop_scale))
                             for r in jax.random.split(rng_views, 2)])  # [2B, S, S, 3]
    views = colour_field_jitter(rng_jitter, views, d.field_jitter, d.noise_jitter)
    keep = random_keep(rng_mask, 2 * b, n_patches, n_patches - n_hidden)
    hidden = 1.0 - keep_to_visible(keep, n_patches)  # [2B, N], 1 = hidden
    state = model_state["dino_state"]
    teacher = model.apply({"params": jax.lax.stop_gradient(model_state["ema_teacher"])}, views)
    student = model.apply({"params": params}, views, mask=hidden > 0)

    t_cls = dino.teacher_distribution(teacher["cls_logits"], state["center_cls"],
                                      d.teacher_temperature)
    ce_cls = dino.cross_entropy(jnp.roll(t_cls.reshape(2, b, k), 1, axis=0).reshape(2 * b, k),
                                student["cls_logits"], d.student_temperature)  # Other view.
    t_patch = dino.teacher_distribution(teacher["patch_logits"], state["center_patch"],
                                        d.teacher_temperature)
    ce_patch = dino.cross_entropy(t_patch, student["patch_logits"], d.student_temperature)
    dino_loss = ce_cls.mean()
    ibot_loss = jnp.sum(ce_patch * hidden) / jnp.maximum(jnp.sum(hidden), 1.0)
    total = dino_loss + d.patch_loss_weight * ibot_loss

    entropy = lambda p: -jnp.sum(p * jnp.log(jnp.maximum(p, 1e-12)), axis=-1)
    metrics = {"dino_loss": dino_loss, "ibot_loss": ibot_loss,
               "teacher_entropy": entropy(t_cls).mean(),
               "teacher_mean_entropy": entropy(t_cls.mean(axis=0))}
    new_state = {
        "center_cls": dino.update_center(state["center_cls"], teacher["cls_logits"],
                                         d.center_momentum, axis_name),
        "center_patch": dino.update_center(state["center_patch"], teacher["patch_logits"],
                                           d.center_momentum, axis_name),
        "updates": state["updates"]}
    return total, (metrics, dict(model_state, dino_state=new_state))

  def after_update(params, model_state):
    state = model_state["dino_state"]
    momentum = dino.ema_momentum(state["updates"], config.total_steps, d.teacher_momentum)
    return params, dict(model_state,
                        ema_teacher=dino.ema_update(model_state["ema_teacher"], params, momentum),
                        dino_state=dict(state, updates=state["updates"] + 1))

  def evaluate(ctx: EvalContext) -> dict:
    from vqkd_jax.train.teacher_probe import evaluate_tokens

    return evaluate_tokens(config, tokens_fn(model, ctx.model_state["ema_teacher"]))

  return Objective(init=init, loss=loss, evaluate=evaluate, after_update=after_update)
