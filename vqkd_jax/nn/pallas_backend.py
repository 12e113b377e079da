"""How this package's Pallas kernels run: compiled by Pallas' Triton backend on GPUs, in Pallas'
interpret mode elsewhere (slow: for tests). Shared by nn/decode_attention.py, nn/rms_norm.py and
nn/filtered_draw.py."""

from __future__ import annotations

import jax
from jax.experimental.pallas import triton as pl_triton


def on_gpu() -> bool:
  """Whether the kernels are compiled (JAX's default backend is a GPU)."""
  return jax.default_backend() == "gpu"


def is_power_of_two(n: int) -> bool:
  """Triton's blocks have power-of-two shapes."""
  return n > 0 and n & (n - 1) == 0


def call_params(num_warps: int, num_stages: int) -> dict:
  """pallas_call keyword arguments: Triton's compiler parameters on GPUs, interpret mode
  elsewhere."""
  if on_gpu():
    return dict(compiler_params=pl_triton.CompilerParams(num_warps=num_warps,
                                                         num_stages=num_stages))
  return dict(interpret=True)
