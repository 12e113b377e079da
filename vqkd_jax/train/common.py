"""Small pieces the stage objectives share: dtypes, pixel scaling, frozen models from workdirs."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def compute_dtype(precision: str):
  """"float32" | "bfloat16" -> the computation dtype of the modules (parameters stay float32)."""
  if precision not in ("float32", "bfloat16"):
    raise ValueError(f"precision must be float32 or bfloat16, got {precision!r}")
  return jnp.bfloat16 if precision == "bfloat16" else jnp.float32


def to_unit_range(images_uint8: jax.Array) -> jax.Array:
  """uint8 [0, 255] -> float32 [-1, 1] (what student encoders and decoders see)."""
  return images_uint8.astype(jnp.float32) / 127.5 - 1.0


def to_uint8(images: jax.Array) -> jax.Array:
  """[-1, 1] -> uint8 with truncation, as upstream's dataset decode."""
  return jnp.clip((images.astype(jnp.float32) + 1.0) * 127.5, 0, 255).astype(jnp.uint8)


def variables(params, model_state) -> dict:
  return {"params": params, **(model_state or {})}


def mean_over(values: jax.Array, mask: jax.Array | None) -> jax.Array:
  if mask is None:
    return jnp.mean(values)
  mask = mask.astype(jnp.float32)
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)
