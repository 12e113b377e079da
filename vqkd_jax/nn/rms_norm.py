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

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from vqkd_jax.nn import pallas_backend

NUM_WARPS = 4
SWIGLU_BLOCK = 512  # columns of one program of rms_scaled_swiglu (at most)


def fits(features: int) -> bool:
  """Whether the kernels take rows of `features` (a power of two)."""
  return pallas_backend.is_power_of_two(features)


def _check_features(features: int) -> None:
  if pallas_backend.on_gpu() and not fits(features):
    raise ValueError(f"the Pallas RMSNorm needs a power-of-two feature count, got {features}")


def inverse_rms(x: jax.Array, epsilon: float) -> jax.Array:
  """rsqrt(mean(x^2) + epsilon) of one row x [D] in float32, inside a kernel (this module's and
  nn/decode_attention's)."""
  x = x.astype(jnp.float32)
  return jax.lax.rsqrt(jnp.mean(x * x) + epsilon)


def _kernel(x_ref, scale_ref, o_ref, *, epsilon: float):
  x = x_ref[...].astype(jnp.float32)
  o_ref[...] = (x * (inverse_rms(x, epsilon) *
                     scale_ref[...].astype(jnp.float32))).astype(o_ref.dtype)


def rms_norm(x: jax.Array, scale: jax.Array, epsilon: float, dtype=None) -> jax.Array:
  """x [..., D] normalised by its root mean square over D, times scale [D]; the result in `dtype`
  (default: x's and scale's promoted dtype), one kernel program per row."""
  d = x.shape[-1]
  if scale.shape != (d,):
    raise ValueError(f"scale must be [{d}], got {scale.shape}")
  _check_features(d)
  dtype = dtype or jnp.result_type(x.dtype, scale.dtype)
  rows = x.reshape(-1, d)
  out = pl.pallas_call(
      lambda *refs: _kernel(*refs, epsilon=float(epsilon)),
      out_shape=jax.ShapeDtypeStruct(rows.shape, dtype),
      grid=(rows.shape[0],),
      in_specs=[pl.BlockSpec((None, d), lambda i: (i, 0)), pl.BlockSpec((d,), lambda i: (0,))],
      out_specs=pl.BlockSpec((None, d), lambda i: (i, 0)),
      name="rms_norm", **pallas_backend.call_params(NUM_WARPS, 1))(rows, scale)
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


# ----------------------------------------------------------------------------------------------
# The RMSNorm folded into the next kernel's weights.

def _swiglu_kernel(gate_ref, up_ref, x_ref, o_ref, *, block: int, epsilon: float, dtype):
  """Program (row, j): gate, up [F] (of the GEMM of the un-normalised x), x [D]; columns
  [j block, (j + 1) block), the last block moved back to end at F (F need not be a power of two:
  an overlap is computed and written twice, with the same values, and no access leaves the
  row). Each program computes its row's rsqrt(mean(x^2) + epsilon) from x (D values)."""
  f = o_ref.shape[-1]
  inv = inverse_rms(x_ref[...], epsilon)
  cols = pl.ds(jnp.minimum(pl.program_id(1) * block, f - block), block)
  gate, up = ((ref[cols].astype(jnp.float32) * inv).astype(dtype).astype(jnp.float32)
              for ref in (gate_ref, up_ref))
  o_ref[cols] = (gate * jax.nn.sigmoid(gate) * up).astype(o_ref.dtype)


def rms_scaled_swiglu(gate_up: jax.Array, x: jax.Array, epsilon: float, dtype) -> jax.Array:
  """Llama's MLP activation after an RMSNorm folded into the gate / up kernel.

  With the norm's scale multiplied into the kernel W' = scale[:, None] * W, the GEMM of the
  un-normalised rows gives x W' = RMSNorm(x) W / r for each row's r = rsqrt(mean(x^2) + epsilon).
  This kernel scales gate_up [B, 2, F] (float32: the GEMM's accumulator, not rounded) by r of
  x [B, D] and rounds gate and up to `dtype`, where the unfolded block rounds its GEMM's output,
  then gives silu(gate) * up [B, F] in `dtype`: the norm's kernel and the activation's fusion in
  one kernel. Equal within rounding to RMSNorm, the GEMM and the activation (another order of
  the same products; tests/test_rms_norm.py against a float64 closed form)."""
  b, two, f = gate_up.shape
  if two != 2 or x.ndim != 2 or x.shape[0] != b:
    raise ValueError(f"gate_up must be [B, 2, F] and x [B, D], got {gate_up.shape}, {x.shape}")
  _check_features(x.shape[1])
  block = 1 << (min(f, SWIGLU_BLOCK).bit_length() - 1)
  return pl.pallas_call(
      functools.partial(_swiglu_kernel, block=block, epsilon=float(epsilon),
                        dtype=jnp.dtype(dtype)),
      out_shape=jax.ShapeDtypeStruct((b, f), dtype),
      grid=(b, -(-f // block)),
      in_specs=[pl.BlockSpec((None, None, f), lambda i, j: (i, 0, 0)),
                pl.BlockSpec((None, None, f), lambda i, j: (i, 1, 0)),
                pl.BlockSpec((None, x.shape[1]), lambda i, j: (i, 0))],
      out_specs=pl.BlockSpec((None, f), lambda i, j: (i, 0)),
      name="rms_scaled_swiglu", **pallas_backend.call_params(NUM_WARPS, 1))(gate_up, gate_up, x)
