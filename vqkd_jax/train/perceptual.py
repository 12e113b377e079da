"""The perceptual term of the GAN-trained decoders, chosen by config (`config.loss.perceptual`):

  kind "lpips":      LPIPS v0.1 on VGG16 (evaluation/lpips.py) from converted weights
                     (`weights`: the file written by `vqkd convert lpips`; "random" = random
                     weights, for benchmarks only).
  kind "in_the_box": the offline default. An LPIPS-style distance in the stage feature maps of a CNN
                     classifier trained on the built-in data with the evaluator stage's code
                     (`workdir`: a run of configs/demo/perceptual.py). Deliberately not the FD_eval
                     evaluator itself: the loss must not optimise the metric's own network. Per
                     stage map: unit normalisation over channels, squared difference, mean over
                     channels (LPIPS with every linear head fixed to 1 / C), mean over positions;
                     summed over stages. Its scale is smaller than LPIPS's (the released heads sum
                     to 7..52 per tap, these to 1): see `weight`.
  kind "none":       no perceptual term (distance 0).

`dropout` (default 0) is the rate of the dropout on the squared differences when `train=True`, as
upstream's LPIPS (p = 0.5 active in training); 0 gives a deterministic loss of the same expectation.
`weight` is read by the reconstruction loss (train/reconstruction.py), not here.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections

KINDS = ("lpips", "in_the_box", "none")


def perceptual_config(**overrides) -> ml_collections.ConfigDict:
  """kind ("in_the_box" | "lpips" | "none"), weights (lpips: the converted file), workdir
  (in_the_box: the perceptual network's stage work directory), weight (of the term in the
  reconstruction loss), dropout (train-time rate on the squared differences)."""
  base = dict(kind="in_the_box", weights="", workdir="", weight=1.0, dropout=0.0)
  unknown = set(overrides) - set(base)
  if unknown:
    raise KeyError(f"unknown perceptual fields {sorted(unknown)}; known: {sorted(base)}")
  base.update(overrides)
  return ml_collections.ConfigDict(base)


@dataclasses.dataclass(frozen=True)
class Perceptual:
  """`variables`: the frozen network's pytree (for Objective.frozen). `distance(variables, x, y,
  rng=None, train=False)`: images in [-1, 1] [B, H, W, 3] -> float32 [B]; pure (jit-able); `rng` is
  needed only when train=True and dropout > 0."""
  kind: str
  variables: Any
  distance: Callable[..., jax.Array]


def _dropout(d: jax.Array, rate: float, rng: jax.Array | None, train: bool) -> jax.Array:
  """Inverted dropout on d when training with a rate > 0 (needs rng); identity otherwise."""
  if not train or not rate:
    return d
  if rng is None:
    raise ValueError(f"perceptual dropout {rate} in training needs an rng")
  keep = jax.random.bernoulli(rng, 1.0 - rate, d.shape)
  return jnp.where(keep, d / (1.0 - rate), 0.0)


def stage_distance(stages_x: Sequence[jax.Array], stages_y: Sequence[jax.Array],
                   dropout: float = 0.0, rng: jax.Array | None = None,
                   train: bool = False) -> jax.Array:
  """sum_s mean_{h,w,c} (n(a_s) - n(b_s))^2, n the unit normalisation over channels (eps 1e-10);
  maps [B, h_s, w_s, C_s] -> float32 [B]."""
  from vqkd_jax.evaluation.lpips import unit_normalize

  total = jnp.zeros((stages_x[0].shape[0],), jnp.float32)
  for s, (a, b) in enumerate(zip(stages_x, stages_y, strict=True)):
    d = jnp.square(unit_normalize(a.astype(jnp.float32)) - unit_normalize(b.astype(jnp.float32)))
    d = _dropout(d, dropout, None if rng is None else jax.random.fold_in(rng, s), train)
    total = total + jnp.mean(d, axis=(1, 2, 3))
  return total


def in_the_box_perceptual(model, variables, dropout: float = 0.0) -> Perceptual:
  """The in-the-box distance on a network whose output dict has "stages" (EvaluatorNet, applied in
  inference mode to x and y separately: identical images give exactly 0); see stage_distance."""

  def distance(v, x, y, rng=None, train=False):
    stages = lambda images: model.apply(v, images.astype(jnp.float32), train=False)["stages"]
    return stage_distance(stages(x), stages(y), dropout, rng, train)

  return Perceptual("in_the_box", variables, distance)


def _load_in_the_box(cfg, precision: str) -> Perceptual:
  from vqkd_jax.train import evaluator as evaluator_stage
  from vqkd_jax.train.checkpoint import CheckpointError
  from vqkd_jax.train.common import variables as merge
  from vqkd_jax.train.loop import load_trained

  train_cmd = ("`vqkd train --config configs/demo/perceptual.py --workdir runs/demo/perceptual`, "
               "or set perceptual.kind=lpips / none")
  if not cfg.workdir:
    raise ValueError(f"perceptual.kind=in_the_box needs perceptual.workdir: a run of "
                     f"configs/demo/perceptual.py ({train_cmd})")
  if not os.path.isfile(os.path.join(cfg.workdir, "config.json")):
    raise FileNotFoundError(f"perceptual.workdir {cfg.workdir} holds no trained stage (no "
                            f"config.json): train it first with {train_cmd}")
  try:
    trained = load_trained(cfg.workdir)
  except CheckpointError as e:
    raise ValueError(f"perceptual network in {cfg.workdir} cannot be read: {e}") from e
  stage = trained["config"].get("stage")
  if stage != "evaluator":
    raise ValueError(f"perceptual.workdir {cfg.workdir} holds a {stage!r} stage; the in-the-box "
                     "perceptual network is an evaluator-stage CNN (configs/demo/perceptual.py)")
  model = evaluator_stage.build_model(trained["config"]["model"], precision)
  return in_the_box_perceptual(model, merge(trained["params"], trained["model_state"]),
                               float(cfg.dropout))


def make_perceptual(cfg, precision: str = "float32") -> Perceptual:
  """The perceptual network of `cfg` (perceptual_config) with its frozen variables; `precision`
  ("float32" | "bfloat16") is the computation dtype of its convolutions (outputs stay float32).

  Raises ValueError for an unknown kind, a missing setting or an unreadable/mismatched file, and
  FileNotFoundError for an absent weights file or work directory."""
  from vqkd_jax.train.common import compute_dtype

  dtype = compute_dtype(precision)
  if cfg.kind == "lpips":
    from vqkd_jax.evaluation import lpips as lpips_lib

    if not cfg.weights:
      raise ValueError("perceptual.kind=lpips needs perceptual.weights: the file written by "
                       "`vqkd convert lpips vgg16-397923af.pth OUT --lin vgg.pth` (or set "
                       "perceptual.kind=in_the_box / none)")
    if cfg.weights == "random":
      model = lpips_lib.LPIPS(dtype=dtype, dropout=float(cfg.dropout))
      variables = {"params": lpips_lib.random_lpips_params()}
    else:
      model, variables = lpips_lib.load_lpips(cfg.weights, dtype, dropout=float(cfg.dropout))

    rate = float(cfg.dropout)

    def distance(v, x, y, rng=None, train=False):
      use_dropout = bool(train and rate)
      if use_dropout and rng is None:
        raise ValueError(f"perceptual dropout {rate} in training needs an rng")
      return model.apply(v, x, y, train=use_dropout,
                         rngs={"dropout": rng} if use_dropout else None)

    return Perceptual("lpips", variables, distance)

  if cfg.kind == "in_the_box":
    return _load_in_the_box(cfg, precision)

  if cfg.kind == "none":
    return Perceptual("none", {},
                      lambda v, x, y, rng=None, train=False: jnp.zeros(x.shape[:1], jnp.float32))
  raise ValueError(f"unknown perceptual.kind {cfg.kind!r}; choose from {', '.join(KINDS)}")
