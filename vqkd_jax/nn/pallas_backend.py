"""How this package's Pallas kernels run: compiled by Pallas' Triton backend on GPUs, in Pallas'
interpret mode elsewhere (slow: for tests). Shared by nn/decode_attention.py, nn/rms_norm.py and
nn/filtered_draw.py.

XLA compiles Triton kernels for CUDA GPUs of compute capability 8.0 (Ampere) and later only
("Triton support is only enabled for Ampere GPUs"): on a T4 (7.5, Colab's common card) or a V100
the "auto" settings that pick these kernels (`kernels_supported`) choose XLA's ops instead."""

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


def gpu_compute_capability(device=None) -> tuple[int, int] | None:
  """(major, minor) CUDA compute capability of `device` (default: JAX's first device when the
  default backend is a GPU), or None (no GPU, or a GPU without one, such as ROCm's)."""
  if device is None:
    if not on_gpu():
      return None
    device = jax.devices()[0]
  try:
    major, minor = str(getattr(device, "compute_capability", "")).split(".")[:2]
    return int(major), int(minor)
  except ValueError:
    return None


def kernels_supported() -> bool:
  """Whether the kernels compile here: a CUDA GPU of compute capability 8.0 or later (what XLA's
  Triton backend takes; cuDNN's fused attention asks the same, nn/attention.py). The "auto"
  settings pick the kernels only then; elsewhere, XLA's ops."""
  cc = gpu_compute_capability()
  return cc is not None and cc >= (8, 0)
