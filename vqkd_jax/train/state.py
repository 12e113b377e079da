"""The training state: a pytree that the update step donates and the checkpoint saves whole."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp


class TrainState(flax.struct.PyTreeNode):
  """step: int32 scalar; params: trained by gradient; opt_state: optax state; model_state:
  non-gradient collections (codebook EMA, batch statistics); rng: uint32[2] base key, folded with
  the step for each update so that resuming reproduces the same randomness."""
  step: jax.Array
  params: Any
  opt_state: Any
  model_state: dict
  rng: jax.Array

  @classmethod
  def create(cls, variables: dict, tx, rng: jax.Array) -> "TrainState":
    variables = dict(variables)
    params = variables.pop("params")
    return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
               model_state=variables, rng=rng)
