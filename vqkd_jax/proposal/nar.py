"""Non-autoregressive (masked-token) class-conditional transformer and its parallel decoder:
MaskGIT / MAGE style (upstream §5.6, whose copy of MAGE is unintegrated and unconditional; this
is the class-conditional form with classifier-free guidance, on the AR model's sequence layout).

Sequence: [class] + N image tokens in raster order (length 1 + N), attended bidirectionally.
Vocabulary of the input embedding, for C classes and K codes:

  [0, C)            class tokens
  C                 the null class (classifier-free guidance; class dropout in training)
  C + 1 + t         image code t in [0, K) (the AR model's offset)
  C + 1 + K         [MASK] (the last id, as MAGE)
  vocab_size        C + K + 2

The head predicts the K image codes only: logits [B, N, K] at the N image positions.

Training (`random_mask`, `masked_sequence`, `masked_token_loss`): per example u ~ U(0, 1), mask
ratio r = cos(pi/2 u), ceil(r N) positions (at least 1) chosen uniformly are replaced by [MASK];
cross-entropy (optionally label-smoothed, MAGE 0.1) on the masked positions only, averaged over all
masked positions of the batch.

Decoding (`sample`): one jitted `lax.scan` over a static number of steps T (8-12). Start all masked;
each step predicts every position in one forward of the doubled batch [cond; uncond] (guided logits
uncond + s (cond - uncond), s constant or rising linearly to the scale), draws a code per position
with `temperature`, keeps the positions fixed earlier, scores confidence log p(drawn) (under the
guided, tempered distribution) + tau_t Gumbel with tau_t = choice_temperature (1 - (t + 1) / T)
(MAGE's annealing) and re-masks the least confident ones so that `mask_schedule(N, T)[t]` stay
masked. Example i draws from fold_in(fold_in(rng, example_offset + i), t): a sample depends on the
seed and its index only.

Text conditioning (proposal/t2i.TextConditionedNAR): num_classes = 0 (image code t has id 1 + t,
[MASK] is 1 + K; id 0, the null class of that layout, is unused) and `prefix` embeddings [B, P,
width] take the class token's place ahead of the image tokens (the caption's projected states, or
one learned start embedding when the blocks cross-attend to a `context` [B, L, width] under its
padding mask: `cross_attention=True`). `sample_from_prefix` decodes from them as `sample` does,
with guidance rows [prefix; uncond_prefix] (and [context; uncond_context]).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vqkd_jax.nn import logits as logits_lib
from vqkd_jax.nn.attention import MultiHeadAttention, dense_init
from vqkd_jax.nn.cross_attention import CrossAttention
from vqkd_jax.nn.vit import Mlp, layer_norm
from vqkd_jax.parallel.xla_options import CUBLAS_GEMMS, jit_with_options
from vqkd_jax.proposal.ar import class_token_ids, image_token_offset, null_class_id
from vqkd_jax.proposal.sampling import (as_variables, cast_floats, cfg_combine,
                                        guidance_context_rows, guidance_prefix_rows)

Dtype = Any


# ----------------------------------------------------------------------------------------------
# Sequence layout.

def mask_token_id(num_classes: int, codebook_size: int) -> int:
  """The [MASK] token: the last id, num_classes + 1 + codebook_size."""
  return num_classes + 1 + codebook_size


def vocab_size(num_classes: int, codebook_size: int) -> int:
  """classes + null class + image codes + [MASK]."""
  return num_classes + codebook_size + 2


def cosine_mask_count(u: jax.Array, num_tokens: int) -> jax.Array:
  """Number of masked tokens for u in [0, 1): ceil(N cos(pi/2 u)) clipped to [1, N]. int32."""
  n = jnp.ceil(num_tokens * jnp.cos(0.5 * jnp.pi * u))
  return jnp.clip(n, 1, num_tokens).astype(jnp.int32)


def random_mask(rng: jax.Array, batch: int, num_tokens: int) -> jax.Array:
  """bool [batch, num_tokens], True = masked: per row cosine_mask_count(u, N), u ~ U(0, 1), of the
  positions, chosen uniformly at random (ranks of i.i.d. uniform noise)."""
  r_ratio, r_pos = jax.random.split(rng)
  count = cosine_mask_count(jax.random.uniform(r_ratio, (batch,)), num_tokens)
  noise = jax.random.uniform(r_pos, (batch, num_tokens))
  rank = jnp.argsort(jnp.argsort(noise, axis=-1), axis=-1)      # a uniform random permutation
  return rank < count[:, None]


def masked_image_ids(codes: jax.Array, mask: jax.Array, num_classes: int,
                     codebook_size: int) -> jax.Array:
  """codes [B, N] (or [B, h, w]) in [0, K), mask bool [B, N] (True = masked) -> int32 [B, N]: the
  image ids (code + num_classes + 1), [MASK] where masked."""
  codes = jnp.asarray(codes).reshape(codes.shape[0], -1).astype(jnp.int32)
  return jnp.where(mask, mask_token_id(num_classes, codebook_size),
                   codes + image_token_offset(num_classes))


def masked_sequence(labels: jax.Array, codes: jax.Array, mask: jax.Array, num_classes: int,
                    codebook_size: int, drop_prob: float = 0.0,
                    rng: jax.Array | None = None) -> jax.Array:
  """labels [B], codes [B, N] (or [B, h, w]) in [0, K), mask bool [B, N] (True = masked) ->
  int32 [B, 1 + N]: [class or null (probability drop_prob)] + image ids, [MASK] where masked."""
  ids = masked_image_ids(codes, mask, num_classes, codebook_size)
  cls = class_token_ids(labels, num_classes, drop_prob, rng)
  return jnp.concatenate([cls[:, None], ids], axis=1)


def masked_token_nll(logits: jax.Array, codes: jax.Array,
                     label_smoothing: float = 0.0) -> jax.Array:
  """Per-position cross-entropy [B, N] of codes [B, N] under logits [B, N, K] (float32); with
  label_smoothing e the target is (1 - e) one-hot + e / K."""
  logits = logits.astype(jnp.float32)
  if not label_smoothing:
    return optax.softmax_cross_entropy_with_integer_labels(logits, codes)
  k = logits.shape[-1]
  target = optax.smooth_labels(jax.nn.one_hot(codes, k, dtype=jnp.float32), label_smoothing)
  return optax.softmax_cross_entropy(logits, target)


def masked_token_loss(logits: jax.Array, codes: jax.Array, mask: jax.Array,
                      label_smoothing: float = 0.0) -> jax.Array:
  """Mean cross-entropy over the masked positions (mask True) of the whole batch; the unmasked
  positions do not count."""
  w = mask.astype(jnp.float32)
  nll = masked_token_nll(logits, codes, label_smoothing)
  return jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)


def masked_token_metrics(logits: jax.Array, codes: jax.Array, mask: jax.Array,
                         label_smoothing: float = 0.0) -> tuple[jax.Array, dict]:
  """(training loss, metrics) of masked-token prediction over the batch: the loss is
  masked_token_loss with label_smoothing; metrics ce (the same), masked_perplexity (exp of the
  unsmoothed mean NLL), masked_accuracy (argmax at the masked positions) and mask_ratio."""
  ce = masked_token_loss(logits, codes, mask, label_smoothing)
  w = mask.astype(jnp.float32)
  correct = (jnp.argmax(logits, axis=-1) == codes).astype(jnp.float32)
  return ce, {"ce": ce, "masked_perplexity": jnp.exp(masked_token_loss(logits, codes, mask)),
              "masked_accuracy": jnp.sum(correct * w) / jnp.maximum(jnp.sum(w), 1.0),
              "mask_ratio": jnp.mean(w)}


def masked_token_sums(logits: jax.Array, codes: jax.Array, mask: jax.Array) -> dict:
  """Per-example sums over the masked positions, for validation over a split: nll_sum,
  correct (argmax hits) and count (masked positions), each [B]."""
  w = mask.astype(jnp.float32)
  correct = (jnp.argmax(logits, axis=-1) == codes).astype(jnp.float32)
  return {"nll_sum": jnp.sum(masked_token_nll(logits, codes) * w, -1),
          "correct": jnp.sum(correct * w, -1), "count": jnp.sum(w, -1)}


# ----------------------------------------------------------------------------------------------
# Model.

class NARBlock(nn.Module):
  """Pre-LN bidirectional block: x + Drop(Attn(LN(x))), x + Drop(MLP(LN(x))). [B, L, D] -> same.
  No attention mask, so `attention="auto"` runs cuDNN's fused kernel on GPU in bfloat16 (with
  train=False, when no gradient is taken, unpadded: `nn.attention.dot_product_attention`).
  cross_attention: x + Drop(CrossAttn(LN(x), context)) between the two, over a context [B, Lc, D]
  with its padding mask [B, Lc]."""
  num_heads: int
  mlp_dim: int
  out_init_std: float = 0.02
  dropout: float = 0.0
  norm_eps: float = 1e-6
  approximate_gelu: bool = True
  attention: str = "auto"
  dtype: Dtype = jnp.float32
  cross_attention: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, context: jax.Array | None = None,
               context_mask: jax.Array | None = None) -> jax.Array:
    drop = lambda h: nn.Dropout(self.dropout, deterministic=not train)(h)
    h = layer_norm("norm1", self.dtype, self.norm_eps)(x)
    h = MultiHeadAttention(self.num_heads, out_init_std=self.out_init_std, dtype=self.dtype,
                           implementation=self.attention, name="attn")(h, differentiable=train)
    x = x + drop(h)
    if self.cross_attention:
      h = layer_norm("norm_cross", self.dtype, self.norm_eps)(x)
      h, _ = CrossAttention(self.num_heads, out_init_std=self.out_init_std,
                            implementation=self.attention, dtype=self.dtype, name="cross_attn")(
                                h, context, context_mask)
      x = x + drop(h)
    h = layer_norm("norm2", self.dtype, self.norm_eps)(x)
    h = Mlp(self.mlp_dim, out_init_std=self.out_init_std, approximate_gelu=self.approximate_gelu,
            dtype=self.dtype, name="mlp")(h)
    return x + drop(h)


class NARTransformer(nn.Module):
  """Bidirectional transformer over [class] + image tokens: tokens int [B, 1 + N] -> logits float32
  [B, N, codebook_size] at the image positions (see the module docstring for the id layout).
  With `prefix` [B, P, width] (text conditioning) the tokens are the N image ids alone, placed
  after the prefix; with cross_attention the blocks also attend to `context` [B, L, width]
  (`context_mask` bool [B, L], None: all real).

  Attributes:
    num_classes, codebook_size: C and K (vocabulary C + K + 2, head K).
    seq_len: 1 + N, the size of the learned position table.
    width, depth, num_heads, mlp_ratio: model width, blocks, heads, MLP hidden = mlp_ratio * width.
    dropout: embedding and residual dropout in train mode (MAGE 0.1).
    norm_eps: LayerNorm epsilon (MAGE 1e-6).
    approximate_gelu: tanh GELU (XLA:GPU fuses it into the matmul) instead of the exact one.
    attention: "xla" | "cudnn" | "auto" (cuDNN on GPU in bfloat16/float16), as the AR model.
    remat: recompute each block's activations in the backward pass.
    dtype: computation dtype (parameters float32; logits always float32).
    cross_attention: a cross-attention sublayer in every block (text conditioning).
  """
  num_classes: int
  codebook_size: int
  seq_len: int
  width: int
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  dropout: float = 0.0
  norm_eps: float = 1e-6
  approximate_gelu: bool = True
  attention: str = "auto"
  remat: bool = False
  dtype: Dtype = jnp.float32
  cross_attention: bool = False

  @nn.compact
  def __call__(self, tokens: jax.Array, train: bool = False, prefix: jax.Array | None = None,
               context: jax.Array | None = None,
               context_mask: jax.Array | None = None) -> jax.Array:
    if self.width % self.num_heads:
      raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
    if self.cross_attention != (context is not None):
      raise ValueError("a cross-attention NARTransformer needs a context, and only it takes one")
    x = nn.Embed(vocab_size(self.num_classes, self.codebook_size), self.width, dtype=self.dtype,
                 name="token_embed",
                 embedding_init=nn.with_logical_partitioning(dense_init(), ("vocab", "embed")))(
                     tokens)
    lead = 1                                           # the class token
    if prefix is not None:
      x, lead = jnp.concatenate([prefix.astype(x.dtype), x], axis=1), prefix.shape[1]
    t = x.shape[1]
    if t > self.seq_len:
      raise ValueError(f"{t} positions do not fit seq_len {self.seq_len}")
    pos = self.param("pos_embed", nn.with_logical_partitioning(dense_init(), (None, "embed")),
                     (self.seq_len, self.width))
    x = x + pos[:t].astype(x.dtype)[None]
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    # (self, x, train, context, context_mask)
    block = nn.remat(NARBlock, static_argnums=(2,)) if self.remat else NARBlock
    std = 0.02 / math.sqrt(2 * self.depth)            # GPT-2's scaled residual projections
    for i in range(self.depth):
      x = block(self.num_heads, int(self.mlp_ratio * self.width), std, self.dropout,
                self.norm_eps, self.approximate_gelu, self.attention, self.dtype,
                cross_attention=self.cross_attention, name=f"block{i}")(
                    x, train, context, context_mask)
    x = layer_norm("norm_out", self.dtype, self.norm_eps)(x[:, lead:])
    # Operands in the computation dtype, logits accumulated and returned in float32; the
    # backward's matmuls in the computation dtype (nn/logits.py).
    kernel = self.param("head", nn.with_logical_partitioning(dense_init(), ("embed", "vocab")),
                        (self.width, self.codebook_size))
    bias = self.param("head_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
                      (self.codebook_size,))
    logits = logits_lib.logits(x.astype(self.dtype), kernel.astype(self.dtype))
    return logits + bias.astype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# Parallel decoding.

def mask_schedule(num_tokens: int, steps: int) -> np.ndarray:
  """int [steps]: how many tokens are still masked after each decoding step, the same for every
  example: m_t = floor(N cos(pi/2 (t + 1) / T)), at least 1 and at most the number still masked
  for t < T - 1, and 0 at t = T - 1. (The floor is non-increasing, so only the lower clip ever
  binds. MAGE clips at (still masked) - 1 instead, so that every step fixes a token; that differs
  only when T is large against N, e.g. 9 tokens in 12 steps, where the cosine counts repeat and a
  step here re-draws without fixing anything.)
  """
  if steps < 1:
    raise ValueError(f"decoding needs at least one step, got {steps}")
  out, remaining = [], num_tokens
  for t in range(steps):
    if t == steps - 1:
      m = 0
    else:
      m = math.floor(num_tokens * math.cos(0.5 * math.pi * (t + 1) / steps))
      m = max(1, min(remaining, m))
    out.append(m)
    remaining = m
  return np.asarray(out, np.int32)


def cfg_scales(cfg_scale: float | None, steps: int, schedule: str = "constant") -> np.ndarray:
  """float32 [steps]: the guidance scale of each step. "constant": s throughout; "linear": rising
  1 + (s - 1) (t + 1) / T, reaching s at the last step. No guidance: ones."""
  if cfg_scale is None:
    return np.ones(steps, np.float32)
  if schedule == "constant":
    return np.full(steps, cfg_scale, np.float32)
  if schedule == "linear":
    return (1.0 + (cfg_scale - 1.0) * (np.arange(steps) + 1) / steps).astype(np.float32)
  raise ValueError(f"unknown cfg schedule {schedule!r}: constant, linear")


def choice_temperatures(choice_temperature: float, steps: int) -> np.ndarray:
  """float32 [steps]: the Gumbel-noise temperature of the confidence at each step,
  choice_temperature (1 - (t + 1) / T) (MAGE)."""
  return (choice_temperature * (1.0 - (np.arange(steps) + 1) / steps)).astype(np.float32)


def _decode_step(logits, codes, known, keys, remaining, scale, gumbel_temp, *, batch, cfg,
                 temperature):
  """One decoding step on the model's logits [rows, N, K] (rows [cond; uncond] with CFG):
  returns (codes, known) after drawing, keeping the fixed positions and re-masking the least
  confident drawn ones so that `remaining` stay masked."""
  if cfg:
    logits = cfg_combine(logits[:batch], logits[batch:], scale)        # uncond + s (cond - uncond)
  if temperature > 0:
    logits = logits / temperature
  draw_keys, noise_keys = jax.vmap(lambda k: jax.random.split(k), out_axes=1)(keys)
  if temperature > 0:
    drawn = jax.vmap(jax.random.categorical)(draw_keys, logits).astype(jnp.int32)    # [B, N]
  else:
    drawn = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  drawn = jnp.where(known, codes, drawn)
  logp = (jnp.take_along_axis(logits, drawn[..., None], axis=-1)[..., 0]
          - jax.nn.logsumexp(logits, axis=-1))
  noise = jax.vmap(lambda k: jax.random.gumbel(k, drawn.shape[1:]))(noise_keys)
  confidence = jnp.where(known, jnp.inf, logp + gumbel_temp * noise)
  rank = jnp.argsort(jnp.argsort(confidence, axis=-1), axis=-1)        # 0 = least confident
  return drawn, rank >= remaining


def _decode(logits_fn, b, rng, example_offset, *, num_image_tokens, num_classes, codebook_size,
            steps, cfg_scale, cfg_schedule, temperature, choice_temperature, return_history):
  """The decoding scan for b examples; logits_fn(image ids [rows, N]) -> logits [rows, N, K] (rows
  [cond; uncond] with guidance)."""
  n = num_image_tokens
  cfg = cfg_scale is not None
  lo, mask_id = image_token_offset(num_classes), mask_token_id(num_classes, codebook_size)
  example_keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(example_offset + jnp.arange(b))

  def body(carry, xs):
    codes, known = carry
    t, remaining, scale, gumbel_temp = xs
    ids = jnp.where(known, codes + lo, mask_id)
    if cfg:
      ids = jnp.concatenate([ids, ids])
    logits = logits_fn(ids)
    keys = jax.vmap(lambda k: jax.random.fold_in(k, t))(example_keys)
    codes, known = _decode_step(logits, codes, known, keys, remaining, scale, gumbel_temp,
                                batch=b, cfg=cfg, temperature=temperature)
    return (codes, known), ((codes, known) if return_history else None)

  xs = (jnp.arange(steps, dtype=jnp.int32), jnp.asarray(mask_schedule(n, steps)),
        jnp.asarray(cfg_scales(cfg_scale, steps, cfg_schedule)),
        jnp.asarray(choice_temperatures(choice_temperature, steps)))
  init = (jnp.zeros((b, n), jnp.int32), jnp.zeros((b, n), bool))
  (codes, _), history = jax.lax.scan(body, init, xs)
  return (codes, history) if return_history else codes


_STATIC = ("model", "num_image_tokens", "num_classes", "codebook_size", "steps", "cfg_scale",
           "cfg_schedule", "temperature", "choice_temperature", "return_history")
# The decoder's matmuls through cuBLAS, which fuses their bias + tanh-GELU epilogues (H200, bf16,
# 24 x 768, 8 steps, batch 64: 463 -> 509 images/s; see parallel/xla_options.py).
_sampler = functools.partial(jit_with_options, compiler_options=CUBLAS_GEMMS,
                             static_argnames=_STATIC)


@_sampler
def _sample(model, variables, labels, rng, example_offset, **static):
  variables = cast_floats(variables, model.dtype)
  cls = labels.astype(jnp.int32)
  if static["cfg_scale"] is not None:
    cls = jnp.concatenate([cls, jnp.full_like(cls, null_class_id(static["num_classes"]))])
  logits_fn = lambda ids: model.apply(variables, jnp.concatenate([cls[:, None], ids], axis=1))
  return _decode(logits_fn, labels.shape[0], rng, example_offset, **static)


@_sampler
def _sample_prefix(model, variables, prefix, context, context_mask, rng, example_offset,
                   **static):
  variables = cast_floats(variables, model.dtype)
  rows = prefix.shape[0] // (2 if static["cfg_scale"] is not None else 1)
  logits_fn = lambda ids: model.apply(variables, ids, prefix=prefix, context=context,
                                      context_mask=context_mask)
  return _decode(logits_fn, rows, rng, example_offset, **static)


def _static(model, n, steps, cfg_scale, cfg_schedule, temperature, choice_temperature,
            return_history) -> dict:
  guided = cfg_scale is not None and float(cfg_scale) != 1.0
  return dict(num_image_tokens=n, num_classes=model.num_classes,
              codebook_size=model.codebook_size, steps=int(steps),
              cfg_scale=float(cfg_scale) if guided else None, cfg_schedule=cfg_schedule,
              temperature=float(temperature), choice_temperature=float(choice_temperature),
              return_history=return_history)


def sample(model: NARTransformer, params, labels, *, rng: jax.Array, steps: int = 8,
           cfg_scale: float | None = 1.75, cfg_schedule: str = "constant",
           temperature: float = 1.0, choice_temperature: float = 4.5,
           example_offset: int = 0, num_image_tokens: int | None = None,
           return_history: bool = False):
  """Image code indices int32 [B, N] in [0, K) for class labels [B], by `steps` parallel decoding
  steps (one jitted scan; one compilation per distinct static setting).

  params: the model's `params` collection (or its variables dict). cfg_scale None or 1: no
  guidance (and no doubled batch). temperature 0: argmax draws. choice_temperature: the initial
  Gumbel temperature of the confidence (annealed linearly to 0). example_offset: the index of
  labels[0] in a larger set (per-example random streams). num_image_tokens: N (default
  model.seq_len - 1). return_history: also (codes, known) per step, each [steps, B, N] (known:
  fixed after that step), for tests.
  """
  n = model.seq_len - 1 if num_image_tokens is None else int(num_image_tokens)
  if n + 1 > model.seq_len:
    raise ValueError(f"{n} image tokens do not fit seq_len {model.seq_len}")
  return _sample(model, as_variables(params), jnp.asarray(labels, jnp.int32), rng,
                 jnp.asarray(example_offset, jnp.int32),
                 **_static(model, n, steps, cfg_scale, cfg_schedule, temperature,
                           choice_temperature, return_history))


def sample_from_prefix(model: NARTransformer, params, prefix, *, rng: jax.Array,
                       uncond_prefix=None, context=None, context_mask=None, uncond_context=None,
                       steps: int = 8, cfg_scale: float | None = 1.75,
                       cfg_schedule: str = "constant", temperature: float = 1.0,
                       choice_temperature: float = 4.5, example_offset: int = 0,
                       return_history: bool = False):
  """Image code indices int32 [B, N] in [0, K) after prefix embeddings [B, P, width] (text
  conditioning; N = model.seq_len - P), decoded as `sample` does.

  uncond_prefix: [P, width] (or [B, P, width]), the guidance rows' prefix (the learned null
  prefix, or the start embedding); cross-attention models: context [B, L, width], context_mask
  bool [B, L] (None: all real) and uncond_context [L, width] (all real). The unconditional parts
  are needed unless cfg_scale is None or 1. Other arguments as `sample`."""
  prefix = jnp.asarray(prefix)
  if prefix.ndim != 3 or prefix.shape[-1] != model.width:
    raise ValueError(f"prefix must be [B, P, {model.width}], got {prefix.shape}")
  static = _static(model, model.seq_len - prefix.shape[1], steps, cfg_scale, cfg_schedule,
                   temperature, choice_temperature, return_history)
  cfg = static["cfg_scale"] is not None
  uncond = None if uncond_prefix is None else jnp.asarray(uncond_prefix, prefix.dtype)
  rows = guidance_prefix_rows(prefix, uncond, cfg)
  context, context_mask = guidance_context_rows(context, context_mask, uncond_context, cfg)
  return _sample_prefix(model, as_variables(params), rows, context, context_mask, rng,
                        jnp.asarray(example_offset, jnp.int32), **static)
