"""Output logits in float32 from low-precision activations and kernel, with the backward's matmuls
in the operands' dtype and the vocabulary padded to aligned rows.

`logits(x, kernel)`: x [..., D] @ kernel [D, V] accumulated and returned in float32 (the softmax
and the cross-entropy read float32 logits). Two things differ from jnp.einsum with
preferred_element_type=float32, neither changing the forward's values:
  - The backward casts the float32 cotangent to the operands' dtype before its two matmuls
    (dx = g k^T, dk = x^T g; float32 accumulation), as the rest of a bfloat16 network's backward
    runs (PyTorch autocast's bfloat16 head computes the same). JAX's own transpose multiplies the
    float32 cotangent by the operand upcast to float32: two float32 (on GPUs TF32) GEMMs over the
    whole [tokens, vocabulary] cotangent.
  - The matmuls run on the kernel padded with zero columns to a multiple of VOCAB_MULTIPLE, the
    logits sliced back to V (the cotangent padded with zeros). The AR vocabulary (1,000 classes +
    the null class + 8,192 codes = 9,193) is odd: its rows of bfloat16 or float32 are not 16-byte
    aligned, which the GPU's tensor-memory loads need.
Llama medium training on an H100 (batch 96, 257 tokens, bf16; 6 Dec 2026, each pair alternated in
one process): the head's three GEMMs took 10.3 of 124 ms of kernels (two of them TF32); the
bfloat16 backward 127.6-127.9 -> 123.5-123.9 ms per step, the padding -> 120.0-120.6 ms (49.1% ->
52.4% MFU). GPT-2 medium (tied head): 202.4 -> 198.9 -> 196.1 ms.

With float32 operands this is jnp.einsum's product and JAX's backward (no cast, no padding: the
CPU runs of the demo train in float32, where padding would only add work).

`LogitsHead`: the parameter "kernel" [D, V] (flax nn.Einsum's name, shape and initialiser call)
applied through `logits`.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp


VOCAB_MULTIPLE = 128   # the vocabulary padded to this in the matmuls (aligned rows for TMA)


def _matmul(a, b, contract_a: tuple[int, ...], contract_b: tuple[int, ...]):
  return jax.lax.dot_general(a, b, ((contract_a, contract_b), ((), ())),
                             preferred_element_type=jnp.float32)


def padded_kernel(kernel):
  """kernel [D, V] with zero columns up to a multiple of VOCAB_MULTIPLE (also the decoding loop's
  head, padded once: proposal.ar.fuse_for_decoding)."""
  return jnp.pad(kernel, ((0, 0), (0, -kernel.shape[1] % VOCAB_MULTIPLE)))


def _fwd(x, kernel):
  """The logits, and the residuals of the backward: x and the padded kernel."""
  padded = padded_kernel(kernel)
  return _matmul(x, padded, (x.ndim - 1,), (0,))[..., :kernel.shape[1]], (x, padded)


@jax.custom_vjp
def _low_precision_logits(x, kernel):
  return _fwd(x, kernel)[0]


def _bwd(res, g):
  x, padded = res
  v = g.shape[-1]
  g = jnp.pad(g.astype(x.dtype), [(0, 0)] * (g.ndim - 1) + [(0, padded.shape[1] - v)])
  dx = _matmul(g, padded, (g.ndim - 1,), (1,))                           # [..., D]
  lead = tuple(range(x.ndim - 1))
  dk = _matmul(x, g, lead, lead)[:, :v]                                  # [D, V]
  return dx.astype(x.dtype), dk.astype(padded.dtype)


_low_precision_logits.defvjp(_fwd, _bwd)


def logits(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """float32 [..., V] = x [..., D] @ kernel [D, V] (operands of one dtype; see the module
  docstring for the backward)."""
  if x.dtype != kernel.dtype:
    raise ValueError(f"logits: operands of one dtype, got {x.dtype} and {kernel.dtype}")
  if x.dtype == jnp.float32:
    return _matmul(x, kernel, (x.ndim - 1,), (0,))
  return _low_precision_logits(x, kernel)


class LogitsHead(nn.Module):
  """[..., D] -> float32 logits [..., features] through the kernel "kernel" [D, features] cast to
  `dtype` (nn.Einsum's parameter: checkpoints of either load into the other)."""
  features: int
  dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
    return logits(x.astype(self.dtype), kernel.astype(self.dtype))
