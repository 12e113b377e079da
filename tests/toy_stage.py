"""A small but real objective for loop tests: a tiny VQ-KD tokenizer distilling a fixed random
"teacher" (a linear map of each patch), so that codebook statistics are part of every test.

Used in-process and by subprocess scripts (8 simulated devices), so it imports nothing from tests.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vqkd_jax.config import training_config
from vqkd_jax.tokenizers.vqkd import VQKDTokenizer, cosine_distillation_loss
from vqkd_jax.train.common import to_unit_range
from vqkd_jax.train.objective import Objective
from vqkd_jax.train.optimizers import optimizer_config

IMAGE, PATCH, TEACHER_DIM = 16, 4, 16


def toy_config(**overrides):
  c = training_config("toy", total_steps=6, batch_size=16, log_every=1, checkpoint_every=3)
  c.data.synthetic = True
  c.data.image_size = IMAGE
  c.data.num_classes = 4
  c.optimizer = optimizer_config(lr=3e-3, warmup_steps=2, end_lr=1e-4, grad_clip_norm=1.0)
  c.model = ml_collections.ConfigDict(dict(
      image_size=IMAGE, patch_size=PATCH, width=64, depth=1, num_heads=8, num_codes=16,
      code_dim=8, decoder_width=64, decoder_depth=1, decoder_heads=8, teacher_dim=TEACHER_DIM))
  for k, v in overrides.items():
    keys = k.split("__")
    node = c
    for key in keys[:-1]:
      node = node[key]
    node[keys[-1]] = v
  return c


def teacher_tokens(images_uint8):
  """A fixed random linear map of each 4x4x3 patch: [B, N, TEACHER_DIM]."""
  x = to_unit_range(images_uint8)
  b = x.shape[0]
  g = IMAGE // PATCH
  patches = x.reshape(b, g, PATCH, g, PATCH, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, g * g, -1)
  w = jnp.asarray(np.random.default_rng(0).normal(size=(PATCH * PATCH * 3, TEACHER_DIM)),
                  jnp.float32)
  return patches @ w


def toy_objective(config, axis_name=None):
  model = VQKDTokenizer(**dict(config.model), axis_name=axis_name)

  def init(rng, batch):
    return model.init({"params": rng, "codebook": rng}, to_unit_range(batch["image"]), train=False)

  def loss(params, model_state, frozen, batch, rng, train):
    out, new_state = model.apply({"params": params, **model_state}, to_unit_range(batch["image"]),
                                 train=train, mutable=["codebook"], rngs={"codebook": rng})
    distill = cosine_distillation_loss(out["features_pred"], teacher_tokens(batch["image"]))
    total = distill + out["commitment_loss"]
    used = jnp.sum(out["usage_counts"] > 0).astype(jnp.float32)
    return total, ({"distill": distill, "codes_used": used}, new_state)

  return Objective(init=init, loss=loss)
