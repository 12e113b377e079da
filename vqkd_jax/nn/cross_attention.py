"""Cross-attention of a sequence to a context (text-conditioned proposal networks, proposal/t2i.py)
with a key padding mask over the context, and the context keys / values computed once for a
decoding loop."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqkd_jax.nn.attention import dot_product_attention, head_projection, output_projection

Dtype = Any


def context_padding_mask(context_mask: jax.Array | None) -> jax.Array | None:
  """bool [B, L] (True = a real context token) -> the attention mask [B, 1, 1, L]; None stays
  None (every context token is attended)."""
  return None if context_mask is None else context_mask.astype(bool)[:, None, None, :]


class CrossAttention(nn.Module):
  """Queries from x [B, T, D], keys and values from a context [B, L, Dc]: -> [B, T, D]. Padded
  context tokens (context_mask False) get no weight; scores and softmax in float32.

  `__call__(x, context=None, context_mask=None, context_kv=None)` returns (output, (k, v)) with the
  context's keys / values [B, L, heads, head_dim]: pass `context` to compute them, or their
  `context_kv` from an earlier call (a KV cache: decoding computes them once). `implementation`
  as nn/attention.dot_product_attention (the einsums whenever a mask is given)."""
  num_heads: int
  use_bias: bool = True
  out_init_std: float = 0.02
  implementation: str = "auto"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None = None,
               context_mask: jax.Array | None = None,
               context_kv: tuple[jax.Array, jax.Array] | None = None):
    d = x.shape[-1]
    hd = d // self.num_heads
    proj = lambda name: head_projection(self.num_heads, hd, self.use_bias, self.dtype, name)
    q = proj("query")(x)
    # The key / value projections exist (init) whether or not this call computes them.
    key_proj, value_proj = proj("key"), proj("value")
    if context is not None:
      k, v = key_proj(context), value_proj(context)
    elif context_kv is not None:
      k, v = (a.astype(self.dtype) for a in context_kv)
    else:
      raise ValueError("cross-attention needs the context or its cached keys / values")
    # (The fused kernel takes no padding mask: with one, the einsums.)
    implementation = self.implementation if context_mask is None else "xla"
    y = dot_product_attention(q, k, v, context_padding_mask(context_mask), self.dtype,
                              implementation)
    out = output_projection(d, self.use_bias, self.dtype, self.out_init_std)(y)
    return out, (k, v)
