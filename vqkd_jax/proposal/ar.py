"""Decoder-only transformer for class-conditional token generation (upstream §5.1-5.2).

Two flavours: "gpt2" (learned positions, LayerNorm, GELU-tanh, biases) and "llama" (RMSNorm, SwiGLU,
rotary positions, no biases, zero-initialised output head). A KV cache (explicit pytree) serves
one-token-at-a-time decoding inside one jitted loop (proposal/sampling.py).

Sequence layout: [class] + image tokens in raster order. Vocabulary: classes [0, C), the null class C
(classifier-free guidance), image token t -> C + 1 + t.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from vqkd_jax.nn.attention import dense_init, dot_product_attention

Dtype = Any


def _norm(flavour: str, name: str, dtype):
  init = nn.with_logical_partitioning(nn.initializers.ones, ("norm",))
  if flavour == "llama":
    return nn.RMSNorm(epsilon=1e-5, dtype=dtype, name=name, scale_init=init)
  return nn.LayerNorm(epsilon=1e-5, dtype=dtype, name=name, scale_init=init,
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)))


def rotary(x: jax.Array, positions: jax.Array, theta: float = 10000.0) -> jax.Array:
  """Rotary position embedding (GPT-NeoX/Llama half-split layout) of x [B, T, H, D] at positions [T]."""
  d = x.shape[-1]
  freqs = 1.0 / theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d)
  angles = positions.astype(jnp.float32)[:, None] * freqs[None]          # [T, D/2]
  cos, sin = jnp.cos(angles)[None, :, None], jnp.sin(angles)[None, :, None]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


class CausalAttention(nn.Module):
  """Causal self-attention; with `cache` (k, v [B, S, H, D]) writes this call's keys and values at
  `positions` and attends to every cached position <= the query's."""
  num_heads: int
  use_bias: bool
  use_rope: bool
  out_init_std: float = 0.02
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, positions, cache=None):
    d = x.shape[-1]
    hd = d // self.num_heads
    proj = lambda name: nn.DenseGeneral(
        (self.num_heads, hd), use_bias=self.use_bias, dtype=self.dtype, name=name,
        kernel_init=nn.with_logical_partitioning(dense_init(), ("embed", "heads", "kv")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("heads", "kv")))
    q, k, v = proj("query")(x), proj("key")(x), proj("value")(x)
    if self.use_rope:
      q, k = rotary(q, positions), rotary(k, positions)
    if cache is None:
      t = x.shape[1]
      mask = (jnp.arange(t)[:, None] >= jnp.arange(t)[None])[None, None]
      new_cache = None
    else:
      ck, cv = cache
      ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, positions[0], 0, 0))
      cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, positions[0], 0, 0))
      mask = (jnp.arange(ck.shape[1])[None] <= positions[:, None])[None, None]
      k, v, new_cache = ck, cv, (ck, cv)
    y = dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask, self.dtype)
    out = nn.DenseGeneral(
        d, axis=(-2, -1), use_bias=self.use_bias, dtype=self.dtype, name="out",
        kernel_init=nn.with_logical_partitioning(dense_init(self.out_init_std),
                                                 ("heads", "kv", "embed")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))(y)
    return out, new_cache


class Block(nn.Module):
  num_heads: int
  mlp_hidden: int
  flavour: str
  layer_index: int
  depth: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, positions, cache=None, train: bool = False):
    llama = self.flavour == "llama"
    std = 0.02 if llama else 0.02 / (2 * self.depth) ** 0.5  # GPT-2 scales residual projections.
    h, cache = CausalAttention(self.num_heads, use_bias=not llama, use_rope=llama,
                               out_init_std=std, dtype=self.dtype, name="attn")(
        _norm(self.flavour, "norm1", self.dtype)(x), positions, cache)
    x = x + nn.Dropout(self.dropout, deterministic=not train)(h)
    h = _norm(self.flavour, "norm2", self.dtype)(x)
    dense = lambda f, names, name, s=0.02: nn.Dense(
        f, use_bias=not llama, dtype=self.dtype, name=name,
        kernel_init=nn.with_logical_partitioning(dense_init(s), names),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, names[1:]))
    if llama:
      h = nn.silu(dense(self.mlp_hidden, ("embed", "mlp"), "gate")(h)) * dense(
          self.mlp_hidden, ("embed", "mlp"), "up")(h)
    else:
      h = nn.gelu(dense(self.mlp_hidden, ("embed", "mlp"), "fc1")(h), approximate=True)
    h = dense(x.shape[-1], ("mlp", "embed"), "fc2" if not llama else "down", std)(h)
    return x + nn.Dropout(self.dropout, deterministic=not train)(h), cache


class ARTransformer(nn.Module):
  """tokens [B, T] -> logits [B, T, vocab_size] (float32); with `cache`, also the updated cache.

  Attributes: vocab_size, seq_len (maximum length), width, depth, num_heads, mlp_ratio (GPT-2:
  hidden = ratio * width; Llama: 2/3 of that rounded up to a multiple of 64, as SwiGLU), flavour,
  dropout, dtype.
  """
  vocab_size: int
  seq_len: int
  width: int
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  flavour: str = "gpt2"
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  def mlp_hidden(self) -> int:
    hidden = int(self.mlp_ratio * self.width)
    if self.flavour == "llama":
      hidden = -(-int(2 * hidden / 3) // 64) * 64
    return hidden

  @nn.compact
  def __call__(self, tokens, train: bool = False, positions=None, cache=None):
    if self.flavour not in ("gpt2", "llama"):
      raise ValueError(f"unknown flavour {self.flavour!r}: gpt2, llama")
    t = tokens.shape[1]
    positions = jnp.arange(t) if positions is None else positions
    embed = nn.Embed(self.vocab_size, self.width, dtype=self.dtype, name="token_embed",
                     embedding_init=nn.with_logical_partitioning(dense_init(), ("vocab", "embed")))
    x = embed(tokens)
    if self.flavour == "gpt2":
      pos = self.param("pos_embed", nn.with_logical_partitioning(dense_init(0.01), (None, "embed")),
                       (self.seq_len, self.width))
      x = x + jnp.take(pos, positions, axis=0).astype(x.dtype)[None]
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    new_cache = []
    for i in range(self.depth):
      x, c = Block(self.num_heads, self.mlp_hidden(), self.flavour, i, self.depth, self.dropout,
                   self.dtype, name=f"block{i}")(x, positions, None if cache is None else cache[i],
                                                 train)
      new_cache.append(c)
    x = _norm(self.flavour, "norm_out", self.dtype)(x)
    head_init = nn.initializers.zeros if self.flavour == "llama" else dense_init()
    logits = nn.Dense(self.vocab_size, use_bias=False, dtype=self.dtype, name="head",
                      kernel_init=nn.with_logical_partitioning(head_init, ("embed", "vocab")))(x)
    logits = logits.astype(jnp.float32)
    return logits if cache is None else (logits, new_cache)

  def init_cache(self, batch_size: int, dtype=None):
    """An empty KV cache: per layer (k, v) of [B, seq_len, heads, head_dim]."""
    hd = self.width // self.num_heads
    shape = (batch_size, self.seq_len, self.num_heads, hd)
    dtype = dtype or self.dtype
    return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(self.depth)]


def make_sequence(labels: jax.Array, image_tokens: jax.Array, num_classes: int, drop_prob: float,
                  rng: jax.Array) -> jax.Array:
  """[class or null] + (num_classes + 1 + image tokens): int32 [B, 1 + N]. With probability
  drop_prob per example the class becomes the null class num_classes."""
  labels = labels.astype(jnp.int32)
  if drop_prob > 0:
    labels = jnp.where(jax.random.bernoulli(rng, drop_prob, labels.shape), num_classes, labels)
  return jnp.concatenate([labels[:, None], image_tokens.astype(jnp.int32) + num_classes + 1], 1)


def next_token_loss(logits: jax.Array, seq: jax.Array) -> jax.Array:
  """Mean cross-entropy (full vocabulary) of predicting seq[:, 1:] from logits[:, :-1]."""
  return optax.softmax_cross_entropy_with_integer_labels(
      logits[:, :-1].astype(jnp.float32), seq[:, 1:]).mean()
