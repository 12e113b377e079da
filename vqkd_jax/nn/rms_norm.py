"""RMSNorm as one Pallas (Triton) kernel, for the few rows of a decoding step.

XLA compiles `flax.linen.RMSNorm` of [128, 1024] bf16 rows into two kernels (the mean of squares,
then the scaling): 1.3 + 1.5 us on an H100, where one kernel takes 1.5 us. A decoding step of a
Llama runs two norms per block, so the kernel saves about 16 ms per batch of 64 images with CFG
at 256 tokens and 24 blocks. It computes what flax computes: x * (rsqrt(mean(x^2) + epsilon) *
scale) in float32, the result in `dtype` (the mean summed in another order: equal within
rounding, tests/test_rms_norm.py).

On GPUs the kernel is compiled by Pallas' Triton backend (the feature count must be a power of
two, as Triton's blocks need); elsewhere it runs in Pallas' interpret mode (for tests).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

NUM_WARPS = 4


def fits(features: int) -> bool:
  """Whether the kernel takes rows of `features` (a power of two)."""
  return features > 0 and features & (features - 1) == 0


def _kernel(x_ref, scale_ref, o_ref, *, epsilon: float):
  x = x_ref[...].astype(jnp.float32)
  mean_square = jnp.mean(x * x)
  o_ref[...] = (x * (jax.lax.rsqrt(mean_square + epsilon) *
                     scale_ref[...].astype(jnp.float32))).astype(o_ref.dtype)


def rms_norm(x: jax.Array, scale: jax.Array, epsilon: float, dtype=None) -> jax.Array:
  """x [..., D] normalised by its root mean square over D, times scale [D]; the result in `dtype`
  (default: x's and scale's promoted dtype), one kernel program per row."""
  d = x.shape[-1]
  if scale.shape != (d,):
    raise ValueError(f"scale must be [{d}], got {scale.shape}")
  on_gpu = jax.default_backend() == "gpu"
  if on_gpu and not fits(d):
    raise ValueError(f"the Pallas RMSNorm needs a power-of-two feature count, got {d}")
  dtype = dtype or jnp.result_type(x.dtype, scale.dtype)
  rows = x.reshape(-1, d)
  if on_gpu:
    params = dict(compiler_params=pl_triton.CompilerParams(num_warps=NUM_WARPS, num_stages=1))
  else:
    params = dict(interpret=True)
  out = pl.pallas_call(
      lambda *refs: _kernel(*refs, epsilon=float(epsilon)),
      out_shape=jax.ShapeDtypeStruct(rows.shape, dtype),
      grid=(rows.shape[0],),
      in_specs=[pl.BlockSpec((None, d), lambda i: (i, 0)), pl.BlockSpec((d,), lambda i: (0,))],
      out_specs=pl.BlockSpec((None, d), lambda i: (i, 0)),
      name="rms_norm", **params)(rows, scale)
  return out.reshape(x.shape)


class RMSNorm(nn.Module):
  """`flax.linen.RMSNorm`'s parameter ("scale" [D], float32) and result, computed by `rms_norm`'s
  kernel. A drop-in for flax's module under the same name (the same parameter tree)."""
  epsilon: float = 1e-6
  dtype: Any = None
  scale_init: Callable = nn.initializers.ones

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", self.scale_init, (x.shape[-1],), jnp.float32)
    return rms_norm(x, scale, self.epsilon, self.dtype)
