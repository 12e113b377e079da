"""Text-conditioned proposal networks over image codes: the caption's states condition an AR
(TextConditionedAR) or a masked-token NAR (TextConditionedNAR) transformer, by prefix tokens or by
cross-attention.

Upstream releases no text-to-image model (upstream.md §5.7: X2I is a generic "condition tokens +
image tokens" base whose only subclass is class-conditional); this follows its layout with a text
condition in place of the class token. A frozen text encoder gives per-token hidden states
[B, L, Dt] and a padding mask [B, L]; a learned linear projection maps them to the transformer's
width. Then (`conditioning`):

  "prefix"           the L projected states are prefix embeddings ahead of the image tokens,
                     padded positions replaced by a learned `pad_embed` (they then carry no caption
                     content, and no attention mask is needed: the cuDNN kernels and the KV cache
                     stay as they are).
  "cross_attention"  every block cross-attends to the L projected states (`context`) under the
                     caption's padding mask; the sequence starts with one learned `start_embed`
                     (the class token's place). AR decoding computes the context's keys / values
                     once, into the KV cache.

AR (TextConditionedAR): [prefix] + image tokens 0 .. N-2 (raster order), causal attention over all
of it, so every image token sees the whole condition; the logits at positions P-1 .. P+N-2 (P the
prefix length: L, or 1) predict image tokens 0 .. N-1; the vocabulary is the codebook alone (token
t has id t). NAR (TextConditionedNAR): [prefix] + N image ids in the NAR's layout with no classes
(code t has id 1 + t, [MASK] is 1 + K), bidirectional; logits at the N image positions.

Classifier-free guidance: with probability `drop_prob` per example the caption is replaced by a
learned null condition of L embeddings (`null_prefix`, or `null_context` whose L tokens are all
real); sampling guides with the rows [caption; null] (proposal/sampling.sample_from_prefix for the
AR, proposal/nar.sample_from_prefix for the NAR; `sampling_inputs` gives their arguments).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from vqkd_jax.nn.attention import dense_init
from vqkd_jax.proposal.ar import ARTransformer
from vqkd_jax.proposal.nar import NARTransformer

CONDITIONINGS = ("prefix", "cross_attention")


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


class TextConditioned(nn.Module):
  """The text condition of TextConditionedAR / TextConditionedNAR (they add `__call__`).

  Attributes:
    transformer: the ARTransformer or NARTransformer, a submodule (params["transformer"]);
      cross_attention=True for conditioning "cross_attention".
    text_length: L, the text encoder's context length.
    conditioning: "prefix" or "cross_attention" (module docstring).

  Parameters besides the transformer's: the projection Dt -> width (`prefix_proj` or
  `context_proj`, initialised so that its outputs start at the token embeddings' scale, std 0.02
  per component for unit-variance text states), the null condition [L, width] (`null_prefix` or
  `null_context`), and `pad_embed` [width] (prefix) or `start_embed` [1, width] (cross-attention).

  prefix(text_states, text_mask, drop=None) -> [B, P, width], P = num_prefix (L, or 1).
  context(text_states, text_mask, drop=None) -> (context [B, L, width], mask bool [B, L]) for
    cross-attention, (None, None) for a prefix.
  unconditional_prefix() -> [P, width]; unconditional_context() -> [L, width] or None.
  sampling_inputs(text_states, text_mask) -> the sampler's keyword arguments (prefix,
    uncond_prefix, context, context_mask, uncond_context).
  drop: bool [B] or None, which examples get the null condition.
  """
  transformer: nn.Module
  text_length: int
  conditioning: str = "prefix"

  def setup(self):
    if self.conditioning not in CONDITIONINGS:
      raise ValueError(f"unknown conditioning {self.conditioning!r}: one of {CONDITIONINGS}")
    if self.transformer.cross_attention != self.cross_attends:
      raise ValueError(f"conditioning {self.conditioning!r} needs a transformer with "
                       f"cross_attention={self.cross_attends}")
    width, dtype = self.transformer.width, self.transformer.dtype
    name = "prefix" if not self.cross_attends else "context"
    self.text_proj = nn.Dense(
        width, dtype=dtype, name=f"{name}_proj",
        kernel_init=nn.with_logical_partitioning(_fan_in_init(0.02), ("mlp", "embed")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))
    self.null_text = self.param(f"null_{name}",
                                nn.with_logical_partitioning(dense_init(), (None, "embed")),
                                (self.text_length, width))
    if self.cross_attends:
      self.start_embed = self.param(
          "start_embed", nn.with_logical_partitioning(dense_init(), (None, "embed")), (1, width))
    else:
      self.pad_embed = self.param(
          "pad_embed", nn.with_logical_partitioning(dense_init(), ("embed",)), (width,))

  @property
  def cross_attends(self) -> bool:
    return self.conditioning == "cross_attention"

  @property
  def num_prefix(self) -> int:
    return 1 if self.cross_attends else self.text_length

  @property
  def num_image_tokens(self) -> int:
    return self.transformer.seq_len - self.num_prefix

  def _project(self, text_states):
    if text_states.shape[1] != self.text_length:
      raise ValueError(f"text states of length {text_states.shape[1]}, the model was built for "
                       f"{self.text_length}")
    return self.text_proj(text_states.astype(self.transformer.dtype))

  def prefix(self, text_states: jax.Array, text_mask: jax.Array,
             drop: jax.Array | None = None) -> jax.Array:
    if self.cross_attends:
      b = text_states.shape[0]
      return jnp.broadcast_to(self.start_embed.astype(self.transformer.dtype),
                              (b, *self.start_embed.shape))
    x = self._project(text_states)
    x = jnp.where(text_mask[..., None], x, self.pad_embed.astype(x.dtype))
    if drop is not None:
      x = jnp.where(drop[:, None, None], self.null_text.astype(x.dtype), x)
    return x

  def context(self, text_states: jax.Array, text_mask: jax.Array,
              drop: jax.Array | None = None):
    if not self.cross_attends:
      return None, None
    x, mask = self._project(text_states), text_mask.astype(bool)
    if drop is not None:
      x = jnp.where(drop[:, None, None], self.null_text.astype(x.dtype), x)
      mask = mask | drop[:, None]
    return x, mask

  def unconditional_prefix(self) -> jax.Array:
    return self.start_embed if self.cross_attends else self.null_text

  def unconditional_context(self) -> jax.Array | None:
    return self.null_text if self.cross_attends else None

  def sampling_inputs(self, text_states: jax.Array, text_mask: jax.Array) -> dict:
    context, context_mask = self.context(text_states, text_mask)
    return {"prefix": self.prefix(text_states, text_mask),
            "uncond_prefix": self.unconditional_prefix(), "context": context,
            "context_mask": context_mask, "uncond_context": self.unconditional_context()}


class TextConditionedAR(TextConditioned):
  """Text states -> condition -> ARTransformer over image codes (vocab_size = K codes, seq_len =
  num_prefix + N image tokens); see TextConditioned for the attributes and methods.

  __call__(text_states [B, L, Dt], text_mask bool [B, L], image_tokens int [B, N] (or [B, h, w]),
    drop bool [B] or None, train) -> logits float32 [B, N, K] predicting image_tokens (teacher
    forcing: image token i is predicted from the condition and tokens < i).
  """

  def __call__(self, text_states: jax.Array, text_mask: jax.Array, image_tokens: jax.Array,
               drop: jax.Array | None = None, train: bool = False) -> jax.Array:
    image_tokens = image_tokens.reshape(image_tokens.shape[0], -1).astype(jnp.int32)
    context, context_mask = self.context(text_states, text_mask, drop)
    logits = self.transformer(image_tokens[:, :-1], train=train,
                              prefix=self.prefix(text_states, text_mask, drop), context=context,
                              context_mask=context_mask)
    return logits[:, self.num_prefix - 1:]


class TextConditionedNAR(TextConditioned):
  """Text states -> condition -> NARTransformer (num_classes 0, seq_len = num_prefix + N) over
  masked image ids; see TextConditioned for the attributes and methods.

  __call__(text_states [B, L, Dt], text_mask bool [B, L], image_ids int [B, N] (nar.
    masked_image_ids(codes, mask, 0, K): code t -> 1 + t, [MASK] = 1 + K), drop bool [B] or None,
    train) -> logits float32 [B, N, K] at every image position.
  """

  def __call__(self, text_states: jax.Array, text_mask: jax.Array, image_ids: jax.Array,
               drop: jax.Array | None = None, train: bool = False) -> jax.Array:
    context, context_mask = self.context(text_states, text_mask, drop)
    return self.transformer(image_ids.astype(jnp.int32), train=train,
                            prefix=self.prefix(text_states, text_mask, drop), context=context,
                            context_mask=context_mask)


def _fan_in_init(std: float):
  """Normal(0, std / sqrt(fan_in)) for a [fan_in, out] kernel: outputs of std `std` for unit
  inputs."""
  def init(key, shape, dtype=jnp.float32):
    return std * shape[0] ** -0.5 * jax.random.normal(key, shape, dtype)
  return init
