"""Optax optimizers and learning-rate schedules from a config group.

config.optimizer fields: name ("adamw" | "adam"), lr, b1, b2, eps, weight_decay, schedule
("constant" | "warmup_cosine" | "cosine"), warmup_steps, warmup_init_factor, end_lr, grad_clip_norm
(0 = off), decay ("weights" = matrices and conv kernels only, as upstream's selective decay | "all").
"""

from __future__ import annotations

import optax


def make_schedule(opt, total_steps: int) -> optax.Schedule:
  """The learning-rate schedule: constant, cosine to end_lr, or linear warmup then cosine."""
  if opt.schedule == "constant":
    return optax.constant_schedule(opt.lr)
  if opt.schedule == "cosine":
    return optax.cosine_decay_schedule(opt.lr, max(total_steps, 1), alpha=opt.end_lr / opt.lr)
  if opt.schedule == "warmup_cosine":
    warmup = min(opt.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=opt.lr * opt.warmup_init_factor, peak_value=opt.lr, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=opt.end_lr)
  raise ValueError(f"unknown optimizer.schedule {opt.schedule!r}: constant, cosine, warmup_cosine")


def decay_mask(params, mode: str):
  """True where weight decay applies. "weights": kernels/embeddings with >= 2 dims, not position
  embeddings, CLS tokens, norms or biases (upstream's selective decay); "all": every parameter."""
  import jax

  if mode == "all":
    return jax.tree.map(lambda _: True, params)
  if mode != "weights":
    raise ValueError(f"unknown optimizer.decay {mode!r}: weights, all")

  def keep(path, leaf):
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    last = names[-1]
    if leaf.ndim < 2 or any(n in ("pos_embed", "cls_token", "position_embedding") for n in names):
      return False
    return last in ("kernel", "embedding")

  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(opt, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns (optimizer, schedule) for config.optimizer."""
  schedule = make_schedule(opt, total_steps)
  if opt.name == "adamw":
    tx = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
                     mask=lambda p: decay_mask(p, opt.decay))
  elif opt.name == "adam":
    tx = optax.adam(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps)
  else:
    raise ValueError(f"unknown optimizer.name {opt.name!r}: adamw, adam")
  if opt.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), tx)
  return tx, schedule


def make_stage_optimizer(config, param_groups=None) -> tuple[optax.GradientTransformation,
                                                             optax.Schedule]:
  """The stage's optimizer: config.optimizer for every parameter, or, when the config has a
  `disc_optimizer` group (GAN stages), config.optimizer for the generator and disc_optimizer for the
  top-level "discriminator" parameters (optax.multi_transform; separate moments and schedules, as
  upstream's two optimizers). `param_groups`: the top-level parameter names. The returned schedule
  is the generator's."""
  tx, schedule = make_optimizer(config.optimizer, config.total_steps)
  if "disc_optimizer" not in config:
    return tx, schedule
  groups = list(param_groups or [])
  if "discriminator" not in groups:
    raise ValueError("config.disc_optimizer is set but the stage has no 'discriminator' "
                     f"parameters (top-level groups: {sorted(groups)})")
  disc_tx, _ = make_optimizer(config.disc_optimizer, config.total_steps)
  labels = {k: "discriminator" if k == "discriminator" else "generator" for k in groups}
  return optax.multi_transform({"generator": tx, "discriminator": disc_tx}, labels), schedule


def optimizer_config(**overrides):
  """Default optimizer group (upstream VQ-KD AdamW recipe); keyword arguments override fields."""
  import ml_collections

  base = dict(name="adamw", lr=2e-4, b1=0.9, b2=0.99, eps=1e-8, weight_decay=1e-4,
              schedule="warmup_cosine", warmup_steps=0, warmup_init_factor=1e-8, end_lr=1e-5,
              grad_clip_norm=0.0, decay="weights")
  unknown = set(overrides) - set(base)
  if unknown:
    raise KeyError(f"unknown optimizer fields {sorted(unknown)}")
  base.update(overrides)
  return ml_collections.ConfigDict(base)
