"""The adversarial part of the GAN-trained decoders (VQGAN, FSQ, the pixel decoder; upstream §3.1,
§3.2, §4): PatchGAN, hinge losses, the adaptive generator weight, the delayed start.

One update trains both players from one loss (the shared loop's single value_and_grad):

  total = generator terms + discriminator term, where
  generator term     = weight * lambda * -mean(D(x_hat))    with D's parameters under stop_gradient
  discriminator term = disc_weight * mean((relu(1 - D(x)) + relu(1 + D(sg(x_hat)))) / 2)

so the generator parameters receive only the generator's gradient and the discriminator's only
its own; the two parameter groups have separate optimizers (`config.disc_optimizer`, an
optax.multi_transform on the top-level "discriminator" parameters: train/optimizers.py). Both
players step on the same batch and the same generator output (upstream recomputes the forward
for the discriminator step after the generator's update: a one-step lag we do not reproduce).

lambda = clip(||dL_rec/dW|| / (||dL_gan/dW|| + 1e-4), 0, 1e4) * adaptive_gain, W = the decoder's
last conv kernel, under stop_gradient (upstream's adaptive weight; per device under pmap, as on
upstream's DDP ranks, global under jit); 1 when `adaptive` is off. Before step `start` both terms
are 0 (the discriminator still runs: its optimizer sees zero gradients).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from vqkd_jax.nn.patchgan import PatchGAN


def gan_config(**overrides) -> ml_collections.ConfigDict:
  """Defaults: upstream VQGAN "dd2_aglwg075" (depth 2, adaptive gain 0.75, from step 0)."""
  base = dict(width=64, depth=2, weight=1.0, disc_weight=1.0, adaptive=True, adaptive_gain=0.75,
              start=0)
  unknown = set(overrides) - set(base)
  if unknown:
    raise KeyError(f"unknown gan fields {sorted(unknown)}; known: {sorted(base)}")
  base.update(overrides)
  return ml_collections.ConfigDict(base)


def build_discriminator(gan_cfg, dtype=jnp.float32, axis_name=None) -> PatchGAN:
  return PatchGAN(width=gan_cfg["width"], depth=gan_cfg["depth"], axis_name=axis_name, dtype=dtype)


def hinge_discriminator_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  """mean((relu(1 - D(x)) + relu(1 + D(x_hat))) / 2) (upstream VQGANDiscriminatorLoss)."""
  return jnp.mean((jax.nn.relu(1.0 - logits_real) + jax.nn.relu(1.0 + logits_fake)) / 2.0)


def generator_loss(logits_fake: jax.Array) -> jax.Array:
  return -jnp.mean(logits_fake)


def adaptive_weight(grad_rec: jax.Array, grad_gan: jax.Array, gain: float) -> jax.Array:
  """clip(||grad_rec|| / (||grad_gan|| + 1e-4), 0, 1e4) * gain, gradients w.r.t. the last layer."""
  ratio = jnp.linalg.norm(grad_rec.ravel()) / (jnp.linalg.norm(grad_gan.ravel()) + 1e-4)
  return jax.lax.stop_gradient(jnp.clip(ratio, 0.0, 1e4) * gain)


def last_layer_grad(apply_last: Callable, kernel: jax.Array, image_grad: jax.Array) -> jax.Array:
  """d L / d kernel from d L / d images through images = apply_last(kernel) (a VJP of the last
  layer alone: no second pass through the network)."""
  _, vjp = jax.vjp(apply_last, kernel)
  return vjp(image_grad.astype(jnp.float32))[0]


def init_discriminator(disc: PatchGAN, rng: jax.Array, images: jax.Array) -> dict:
  return disc.init(rng, images, train=False)


def adversarial_terms(disc: PatchGAN, gan_cfg, disc_params, disc_state: dict, *, recon: jax.Array,
                      real: jax.Array, step: jax.Array, rec_loss_fn: Callable | None = None,
                      apply_last: Callable | None = None, last_kernel: jax.Array | None = None
                      ) -> tuple[jax.Array, jax.Array, dict, dict]:
  """(generator_term, discriminator_term, new disc_state, metrics) for one training step.

  recon: the generator's images [B, H, W, 3] (differentiable w.r.t. the generator); real: the
  targets in [-1, 1]; step: the current update (int32); rec_loss_fn(images) -> scalar: the
  reconstruction loss (for the adaptive weight, with apply_last(kernel) -> images and the kernel's
  current value, see last_layer_grad).
  """
  active = (step >= gan_cfg["start"]).astype(jnp.float32)
  frozen_d = jax.lax.stop_gradient(disc_params)

  def d_apply(params, state, x):
    return disc.apply({"params": params, **state}, x, train=True, mutable=["batch_stats"])

  logits_g, _ = d_apply(frozen_d, disc_state, recon)
  g_loss = generator_loss(logits_g)
  weight = jnp.ones(())
  if gan_cfg["adaptive"]:
    image = jax.lax.stop_gradient(recon)
    g_rec = jax.grad(rec_loss_fn)(image)
    g_gan = jax.grad(lambda x: generator_loss(d_apply(frozen_d, disc_state, x)[0]))(image)
    weight = adaptive_weight(last_layer_grad(apply_last, last_kernel, g_rec),
                             last_layer_grad(apply_last, last_kernel, g_gan),
                             gan_cfg["adaptive_gain"])
  generator_term = active * gan_cfg["weight"] * weight * g_loss

  logits_fake, state = d_apply(disc_params, disc_state, jax.lax.stop_gradient(recon))
  logits_real, state = d_apply(disc_params, state, real)
  d_loss = hinge_discriminator_loss(logits_real, logits_fake)
  discriminator_term = active * gan_cfg["disc_weight"] * d_loss
  metrics = {"gan/generator_loss": g_loss, "gan/discriminator_loss": d_loss,
             "gan/adaptive_weight": weight, "gan/logits_real": jnp.mean(logits_real),
             "gan/logits_fake": jnp.mean(logits_fake), "gan/active": active}
  return generator_term, discriminator_term, dict(state), metrics
