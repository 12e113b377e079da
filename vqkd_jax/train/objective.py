"""What a training stage is to the shared loop: a model's init and loss as pure functions."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

# loss(params, model_state, frozen, batch, rng, train) -> (loss, (metrics, new_model_state))
LossFn = Callable[..., tuple[jax.Array, tuple[dict, dict]]]


@dataclasses.dataclass
class EvalContext:
  """What an evaluator sees: the current variables and where to write."""
  step: int
  params: Any
  model_state: dict
  frozen: Any
  workdir: str
  mesh: Any


@dataclasses.dataclass
class Objective:
  """A stage's trainable model and loss.

  Attributes:
    init: (rng, example_batch) -> variables with logical-partitioning boxes:
      {"params": ..., <non-gradient collections>...}.
    loss: LossFn. `model_state` holds the non-gradient collections (e.g. "codebook", "batch_stats");
      the loss returns their new values. Metrics are scalars averaged over the global batch.
    frozen: arrays the loss reads but never trains (a teacher, a frozen tokenizer); may be None.
    evaluate: optional host-side evaluation `(EvalContext) -> dict of scalars`, writing its own
      image grids under ctx.workdir.
    after_update: optional `(params, model_state) -> (params, model_state)` applied inside the
      update step after the optimizer: non-gradient edits of parameters that the loss computed into
      model_state (CVQ-VAE's dead-code replacement of a gradient-trained codebook).
    init_params: optional `(params) -> params` on the host: the freshly initialised parameters
      (unboxed NumPy arrays) to the ones training starts from (pretrained weights, e.g. the AR
      stage's config.init_from); same tree and shapes. Applied once, never when resuming.
  """
  init: Callable[[jax.Array, dict], dict]
  loss: LossFn
  frozen: Any = None
  evaluate: Callable[[EvalContext], dict] | None = None
  after_update: Callable[[Any, dict], tuple[Any, dict]] | None = None
  init_params: Callable[[Any], Any] | None = None
