"""Multi-head dot-product attention with logical axis names."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqkd_jax.nn import pallas_backend

Dtype = Any


def dense_init(std: float = 0.02):
  return nn.initializers.truncated_normal(std)


class MultiHeadAttention(nn.Module):
  """Self-attention over [B, L, D] -> [B, L, D].

  Attributes:
    num_heads: number of heads; the head dim is D // num_heads.
    causal: mask future positions (autoregressive models).
    use_bias: biases on the q, k, v and output projections.
    out_init_std: std of the output projection (scaled by depth in ViTs).
    dtype: computation dtype.
    implementation: "xla" (einsums, float32 scores and softmax), "cudnn" (fused flash attention),
      or "auto": cudnn on GPU in bfloat16/float16 without a mask (head dim a multiple of 8, at
      most 128), xla otherwise.
  """
  num_heads: int
  causal: bool = False
  use_bias: bool = True
  out_init_std: float = 0.02
  dtype: Dtype = jnp.float32
  implementation: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None,
               differentiable: bool = True) -> jax.Array:
    """differentiable=False: no gradient will be taken through this call (inference), so cuDNN's
    kernel runs at the true sequence length (see `dot_product_attention`)."""
    d = x.shape[-1]
    head_dim = d // self.num_heads
    q, k, v = qkv_projection(x, qkv_params(self.num_heads, head_dim, self.use_bias, d), self.dtype)
    if mask is None and self.causal:
      mask = nn.make_causal_mask(jnp.ones(x.shape[:2], bool))
    y = dot_product_attention(q, k, v, mask, self.dtype, self.implementation, differentiable)
    return output_projection(d, self.use_bias, self.dtype, self.out_init_std)(y)


def _head_projection_params(module: nn.Module, width: int, num_heads: int, head_dim: int,
                            use_bias: bool) -> tuple[jax.Array, jax.Array | None]:
  """`module`'s parameters of a query, key or value projection: kernel [D, heads, head_dim]
  (truncated normal, std 0.02, drawn flat [D, heads * head_dim] and reshaped, as flax's
  DenseGeneral draws it; logical axes embed, heads, kv) and bias [heads, head_dim] (zeros) or
  None."""
  def kernel_init(rng, shape, dtype=jnp.float32):
    return dense_init()(rng, (shape[0], shape[1] * shape[2]), dtype).reshape(shape)
  kernel = module.param("kernel",
                        nn.with_logical_partitioning(kernel_init, ("embed", "heads", "kv")),
                        (width, num_heads, head_dim), jnp.float32)
  if not use_bias:
    return kernel, None
  bias = module.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("heads", "kv")),
                      (num_heads, head_dim), jnp.float32)
  return kernel, bias


class HeadProjection(nn.Module):
  """[..., D] -> [..., heads, head_dim]: a query, key or value projection, computed as flax's
  DenseGeneral computes it (operands in `dtype`)."""
  num_heads: int
  head_dim: int
  use_bias: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel, bias = _head_projection_params(self, x.shape[-1], self.num_heads, self.head_dim,
                                           self.use_bias)
    y = jnp.einsum("...d,dhk->...hk", x.astype(self.dtype), kernel.astype(self.dtype))
    return y if bias is None else y + bias.astype(self.dtype)


def head_projection(num_heads: int, head_dim: int, use_bias: bool, dtype, name: str
                    ) -> HeadProjection:
  """[..., D] -> [..., heads, head_dim], a query, key or value projection named `name`."""
  return HeadProjection(num_heads, head_dim, use_bias, dtype, name=name)


class HeadProjectionParams(nn.Module):
  """The parameters of a `head_projection` (the same names, shapes, initial values and logical
  axes), returned instead of applied, so that `qkv_projection` can run the query, key and value
  projections as one matmul."""
  num_heads: int
  head_dim: int
  use_bias: bool = True

  @nn.compact
  def __call__(self, width: int) -> tuple[jax.Array, jax.Array | None]:
    return _head_projection_params(self, width, self.num_heads, self.head_dim, self.use_bias)


def qkv_params(num_heads: int, head_dim: int, use_bias: bool, width: int) -> list:
  """The (kernel, bias) of the query, key and value projections (`HeadProjectionParams` named
  query, key, value), as submodules of the module whose compact method calls this."""
  return [HeadProjectionParams(num_heads, head_dim, use_bias, name=n)(width)
          for n in ("query", "key", "value")]


def qkv_projection(x: jax.Array, params, dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
  """q, k, v [..., heads, head_dim] of x [..., D] by the three (kernel, bias) of `params`, as one
  matmul against their kernels stacked [D, 3, heads, head_dim] (in `dtype`, as DenseGeneral
  computes each): one GEMM forward, and in the backward one GEMM for x's gradient where three
  projections take three and a sum of their outputs (VQ-KD step, ViT-B/16 at batch 256 on an
  H100: the three bias additions of the frozen teacher and the sum were 3.3 ms of kernels)."""
  kernel = jnp.stack([p[0] for p in params], axis=1).astype(dtype)
  y = jnp.einsum("...d,dthk->...thk", x.astype(dtype), kernel)
  if params[0][1] is not None:
    y = y + jnp.stack([p[1] for p in params]).astype(dtype)
  return y[..., 0, :, :], y[..., 1, :, :], y[..., 2, :, :]


def output_projection(width: int, use_bias: bool, dtype, init_std: float = 0.02,
                      name: str = "out") -> nn.DenseGeneral:
  """[..., heads, head_dim] -> [..., width], the attention output projection (normal(init_std)
  kernel; logical axes heads, kv, embed)."""
  return nn.DenseGeneral(
      width, axis=(-2, -1), use_bias=use_bias, dtype=dtype, name=name,
      kernel_init=nn.with_logical_partitioning(dense_init(init_std), ("heads", "kv", "embed")),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))


def use_cudnn(implementation: str, q: jax.Array, mask) -> bool:
  """Whether `implementation` ("auto" | "xla" | "cudnn") means cuDNN's fused attention here."""
  if implementation not in ("auto", "xla", "cudnn"):
    raise ValueError(f"attention implementation {implementation!r}: auto, xla, cudnn")
  if implementation != "auto":
    return implementation == "cudnn"
  return mask is None and fused_attention_available(q.dtype, q.shape[-1])


def fused_attention_available(dtype, head_dim: int) -> bool:
  """cuDNN flash attention applies: a CUDA GPU of compute capability 8.0 or later (cuDNN's fused
  attention in bfloat16/float16 needs Ampere), bfloat16/float16, head dim a multiple of 8 up to
  128."""
  return (pallas_backend.kernels_supported() and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
          and head_dim % 8 == 0 and head_dim <= 128)


def dot_product_attention(q, k, v, mask, dtype, implementation: str = "xla",
                          differentiable: bool = True):
  """softmax(q k^T / sqrt(d)) v over [B, L, H, d] with an optional boolean mask [B, 1|H, Lq, Lk];
  float32 scores and softmax (inside the fused kernel too).

  differentiable: cuDNN's backward wants the sequence length a multiple of 8, so its call pads the
  end and passes the true length (the padded keys masked out). False (inference: no gradient is
  taken through the call; cuDNN's backward would reject an odd length) runs cuDNN at the true
  length: the pads and the slice are each a copy of q, k, v or the output. H200, the NAR model's
  257 tokens at batch 64 (12 heads of 64): 127 against 178 us per attention, the same output."""
  if use_cudnn(implementation, q, mask):
    b, t = q.shape[:2]
    if not differentiable:
      return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    # (Padding the tokens once per model instead was slower on an H100, ViT-B/16 at batch 256:
    # XLA then adds layout transposes around every attention, which the per-layer pads had
    # absorbed: 135 vs 125 ms per step.)
    pad = ((0, 0), (0, -t % 8), (0, 0), (0, 0))
    q, k, v = (jnp.pad(a, pad) for a in (q, k, v))
    lengths = jnp.full((b,), t, jnp.int32)
    y = jax.nn.dot_product_attention(q, k, v, query_seq_lengths=lengths,
                                     key_value_seq_lengths=lengths, implementation="cudnn")
    return y[:, :t]
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum("bqhd,bkhd->bhqk", q * scale, k).astype(jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)
