"""XLA compiler options for one compiled function, and a jit that applies them where JAX allows.

Options are per function (`jax.jit(..., compiler_options=...)`), not process-wide XLA_FLAGS, so one
process can run computations that want different choices. The CPU backend accepts the GPU options
and ignores them (tests/test_parallel.py); on TPU they are not tried. Measured on an H200 (each
against XLA's defaults in the same session):

  CUBLAS_GEMMS: every matmul through cuBLAS / cuBLASLt instead of XLA's autotuned Triton GEMM
    fusions; cuBLASLt then takes the bias and tanh-GELU epilogues. NAR sampling (24 x 768, bf16,
    8 steps, batch 64) 463 -> 509 images/s without CFG, 247 -> 263 with (the whole process under
    the flag: 523 / 272). AR sampling with its KV cache: slower with the model's own q/k/v
    kernels (141 -> 132), faster with them laid out as one kernel (sampling.DECODE_KERNELS
    "fused_cublas", and "folded", the default: 125.0 -> 141.8 on an H100 with CFG and the
    einsum attention, 134 -> 158 with the Pallas one). The VQ-KD, GPT-2 and Llama training
    steps are unchanged (38.3 -> 38.8%, 32.9 -> 32.8%, 51.1 -> 51.1% MFU).
  NCHW_CONVS: cuDNN convolutions in NCHW layout. The FID Inception in exact float32 (batch 256)
    2,289 -> 2,796 images/s; float32 cuDNN kernels without tensor cores are faster in NCHW.
  FAST_COMPILE: LLVM at -O1 instead of -O2, for programs that run once (the training state's
    random initialiser): XLA:CPU compiles the demo VQGAN stage's initialiser in 3.7 s instead of
    7.1 s (the CLIP-style teacher's 2.1 instead of 2.8), with bit-identical values
    (tests/test_training.py). Not for update steps: there -O1 changes float results in the last
    bits (-O0 changes the initialiser's values too).
"""

from __future__ import annotations

import functools

import jax

CUBLAS_GEMMS = {"xla_gpu_enable_triton_gemm": False}
NCHW_CONVS = {"xla_gpu_force_conv_nchw": True}
FAST_COMPILE = {"xla_backend_optimization_level": 1}


def jit_with_options(fun, compiler_options: dict, **jit_kwargs):
  """jax.jit(fun, **jit_kwargs) compiled with `compiler_options` when called at top level.

  JAX takes compiler options only from the outermost jit; called inside another trace (a caller's
  jit, make_jaxpr, scan) this runs as a plain nested jit under the caller's options instead.
  """
  top = jax.jit(fun, compiler_options=dict(compiler_options), **jit_kwargs)
  nested = jax.jit(fun, **jit_kwargs)

  @functools.wraps(fun)
  def call(*args, **kwargs):
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((args, kwargs))):
      return nested(*args, **kwargs)
    try:
      return top(*args, **kwargs)
    except ValueError as e:   # staged into an outer trace through closed-over constants only
      if "top-level" not in str(e):
        raise
      return nested(*args, **kwargs)

  return call
