"""Evaluation helpers shared by the stages: mapping a jitted function over a split, and
`vqkd evaluate` (a stage's evaluator on its newest checkpoint)."""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np

from vqkd_jax.train import inputs as inputs_lib


def map_split(config, fn: Callable[[dict], dict], split: str = "validation",
              batch_size: int | None = None, limit: int | None = None) -> dict[str, np.ndarray]:
  """Applies `fn(batch) -> dict of per-example arrays` to every example of `split` once (the padded
  rows of the last batch dropped by its mask) and concatenates the results on the host.

  `limit` stops after that many examples (in dataset order)."""
  outputs: dict[str, list] = {}
  seen = 0
  for batch in inputs_lib.make_eval_input(config, split, batch_size):
    mask = np.asarray(batch.pop("mask"))
    result = jax.device_get(fn(batch))
    for k, v in result.items():
      outputs.setdefault(k, []).append(np.asarray(v)[mask])
    seen += int(mask.sum())
    if limit is not None and seen >= limit:
      break
  out = {k: np.concatenate(v) for k, v in outputs.items()}
  if limit is not None:
    out = {k: v[:limit] for k, v in out.items()}
  return out


def evaluate_workdir(config, workdir: str) -> dict:
  """Runs the stage's evaluator on the newest checkpoint in `workdir`."""
  from vqkd_jax.train import stages
  from vqkd_jax.train.loop import load_trained
  from vqkd_jax.train.objective import EvalContext

  objective = stages.make_objective(config, workdir=workdir, axis_name=None)
  if objective.evaluate is None:
    raise ValueError(f"stage {config.stage!r} has no evaluator")
  trained = load_trained(workdir)
  ctx = EvalContext(step=trained["step"], params=trained["params"],
                    model_state=trained["model_state"], frozen=objective.frozen,
                    workdir=workdir, mesh=None)
  return objective.evaluate(ctx)
