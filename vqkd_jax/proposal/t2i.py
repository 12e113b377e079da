"""Text-conditioned AR transformer: caption states as prefix tokens ahead of the image tokens.

Upstream releases no text-to-image model (upstream.md §5.7: X2I is a generic "condition tokens +
image tokens" base whose only subclass is class-conditional); this follows its layout with a text
condition in place of the class token. A frozen text encoder gives per-token hidden states
[B, L, Dt] and a padding mask [B, L]; a learned linear projection maps them to L prefix embeddings
of the transformer's width, padded positions replaced by a learned `pad_embed` (they then carry
no caption content, and no attention mask is needed: the cuDNN causal kernel and the KV cache stay
as they are). Sequence: [L prefix embeddings] + image tokens 0 .. N-2 (raster order); causal
attention over all of it, so every image token sees the whole caption. The logits at positions
L-1 .. L+N-2 predict image tokens 0 .. N-1; the vocabulary is the codebook alone (token t has id t).

Classifier-free guidance: with probability `drop_prob` per example the whole prefix is replaced by a
learned null prefix [L, width] (`null_prefix`); sampling (proposal/sampling.sample_from_prefix)
guides with the rows [caption prefix; null prefix].
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from vqkd_jax.nn.attention import dense_init
from vqkd_jax.proposal.ar import ARTransformer


def caption_dropout(rng: jax.Array, batch_size: int, drop_prob: float) -> jax.Array:
  """bool [B]: which examples see the null prefix (Bernoulli(drop_prob) each; none when 0)."""
  if drop_prob <= 0:
    return jnp.zeros((batch_size,), bool)
  return jax.random.bernoulli(rng, drop_prob, (batch_size,))


def image_token_nll(logits: jax.Array, image_tokens: jax.Array) -> jax.Array:
  """Per-token negative log-likelihood [B, N] (nats, float32) of codes [B, N] under logits
  [B, N, K]."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                         image_tokens.astype(jnp.int32))


class TextConditionedAR(nn.Module):
  """Text states -> prefix embeddings -> ARTransformer over image codes.

  Attributes:
    transformer: the ARTransformer (vocab_size = K codes, seq_len = text_length + N image tokens),
      a submodule: its parameters are params["transformer"] and sampling runs it directly.
    text_length: L, the text encoder's context length (the prefix length).

  Parameters besides the transformer's: prefix_proj (Dt -> width, initialised so that the prefix
  starts at the token embeddings' scale, std 0.02 per component for unit-variance text states),
  pad_embed [width], null_prefix [L, width].

  __call__(text_states [B, L, Dt], text_mask bool [B, L], image_tokens int [B, N] (or [B, h, w]),
    drop bool [B] or None, train) -> logits float32 [B, N, K] predicting image_tokens (teacher
    forcing: image token i is predicted from the prefix and tokens < i).
  prefix(text_states, text_mask, drop=None) -> [B, L, width] (what the sampler starts from).
  unconditional_prefix() -> [L, width] (the learned null prefix).
  """
  transformer: ARTransformer
  text_length: int

  def setup(self):
    width, dtype = self.transformer.width, self.transformer.dtype
    self.prefix_proj = nn.Dense(
        width, dtype=dtype,
        kernel_init=nn.with_logical_partitioning(_fan_in_init(0.02), ("mlp", "embed")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))
    self.pad_embed = self.param("pad_embed", nn.with_logical_partitioning(dense_init(), ("embed",)),
                                (width,))
    self.null_prefix = self.param("null_prefix",
                                  nn.with_logical_partitioning(dense_init(), (None, "embed")),
                                  (self.text_length, width))

  @property
  def num_image_tokens(self) -> int:
    return self.transformer.seq_len - self.text_length

  def prefix(self, text_states: jax.Array, text_mask: jax.Array,
             drop: jax.Array | None = None) -> jax.Array:
    if text_states.shape[1] != self.text_length:
      raise ValueError(f"text states of length {text_states.shape[1]}, the model was built for "
                       f"{self.text_length}")
    x = self.prefix_proj(text_states.astype(self.transformer.dtype))
    x = jnp.where(text_mask[..., None], x, self.pad_embed.astype(x.dtype))
    if drop is not None:
      x = jnp.where(drop[:, None, None], self.null_prefix.astype(x.dtype), x)
    return x

  def unconditional_prefix(self) -> jax.Array:
    return self.null_prefix

  def __call__(self, text_states: jax.Array, text_mask: jax.Array, image_tokens: jax.Array,
               drop: jax.Array | None = None, train: bool = False) -> jax.Array:
    image_tokens = image_tokens.reshape(image_tokens.shape[0], -1).astype(jnp.int32)
    prefix = self.prefix(text_states, text_mask, drop)
    logits = self.transformer(image_tokens[:, :-1], train=train, prefix=prefix)
    return logits[:, self.text_length - 1:]


def _fan_in_init(std: float):
  """Normal(0, std / sqrt(fan_in)) for a [fan_in, out] kernel: outputs of std `std` for unit
  inputs."""
  def init(key, shape, dtype=jnp.float32):
    return std * shape[0] ** -0.5 * jax.random.normal(key, shape, dtype)
  return init
