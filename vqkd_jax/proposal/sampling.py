"""Sampling from the AR transformer in one jitted loop with a KV cache (upstream §5.3).

Per step: logits restricted to the image-token slice; classifier-free guidance on logits
(uncond + scale * (cond - uncond)); temperature; top-k; top-p (nucleus); categorical draw. The
random stream of example i is fold_in(rng, example_offset + i) folded with the step, so a sample
depends on the seed and its index only, not on the batch it was drawn in or the device count.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
  """Keeps the logits >= the k-th largest (ties kept), others -inf. k <= 0 keeps all."""
  if not k or k >= logits.shape[-1]:
    return logits
  kth = jax.lax.top_k(logits, k)[0][..., -1:]
  return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_filter(logits: jax.Array, p: float) -> jax.Array:
  """Nucleus filter as transformers' top_k_top_p_filtering: keeps the most probable tokens whose
  cumulative probability before them is < p (always at least one). p >= 1 keeps all."""
  if p is None or p >= 1.0:
    return logits
  order = jnp.argsort(-logits, axis=-1)
  sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs
  remove_sorted = before >= p
  remove_sorted = remove_sorted.at[..., 0].set(False)
  remove = jnp.zeros_like(remove_sorted).at[
      jnp.arange(logits.shape[0])[:, None], order].set(remove_sorted)
  return jnp.where(remove, -jnp.inf, logits)


def guided_logits(logits: jax.Array, batch: int, cfg_scale: float | None) -> jax.Array:
  """CFG on logits: rows [cond; uncond] -> uncond + scale * (cond - uncond)."""
  if not _uses_cfg(cfg_scale):
    return logits
  cond, uncond = logits[:batch], logits[batch:]
  return uncond + cfg_scale * (cond - uncond)


def _uses_cfg(cfg_scale) -> bool:
  return cfg_scale is not None and cfg_scale != 1.0


def _pick(logits, keys, temperature, top_k, top_p):
  logits = logits / temperature
  logits = top_p_filter(top_k_filter(logits, top_k), top_p)
  return jax.vmap(lambda k, l: jax.random.categorical(k, l))(keys, logits).astype(jnp.int32)


def _example_keys(rng, batch, offset):
  return jax.vmap(lambda i: jax.random.fold_in(rng, i))(offset + jnp.arange(batch))


@functools.partial(jax.jit, static_argnames=("model", "num_image_tokens", "num_classes",
                                             "codebook_size", "cfg_scale", "temperature", "top_k",
                                             "top_p"))
def _sample_cached(model, variables, labels, rng, example_offset, *, num_image_tokens,
                   num_classes, codebook_size, cfg_scale, temperature, top_k, top_p):
  b = labels.shape[0]
  cfg = _uses_cfg(cfg_scale)
  first = jnp.concatenate([labels, jnp.full((b,), num_classes)]) if cfg else labels
  rows = first.shape[0]
  cache = model.init_cache(rows)
  logits, cache = model.apply(variables, first[:, None].astype(jnp.int32),
                              positions=jnp.zeros((1,), jnp.int32), cache=cache)
  keys = _example_keys(rng, b, example_offset)
  lo = num_classes + 1

  def body(i, carry):
    cache, logits, out = carry
    l = guided_logits(logits[:, -1, lo:lo + codebook_size], b, cfg_scale if cfg else None)
    tok = _pick(l, jax.vmap(lambda k: jax.random.fold_in(k, i))(keys), temperature, top_k, top_p)
    out = out.at[:, i].set(tok)
    nxt = tok + lo
    nxt = jnp.concatenate([nxt, nxt]) if cfg else nxt
    logits, cache = model.apply(variables, nxt[:, None], positions=(i + 1)[None], cache=cache)
    return cache, logits, out

  out = jnp.zeros((b, num_image_tokens), jnp.int32)
  _, _, out = jax.lax.fori_loop(0, num_image_tokens, body, (cache, logits, out))
  return out


def sample(model, variables, labels, *, num_image_tokens: int, num_classes: int,
           codebook_size: int, rng, cfg_scale: float | None = 1.75, temperature: float = 1.0,
           top_k: int = 600, top_p: float = 0.92, example_offset: int = 0) -> jax.Array:
  """Image tokens [B, num_image_tokens] (values in [0, codebook_size)) for class labels [B]."""
  return _sample_cached(model, variables, jnp.asarray(labels, jnp.int32), rng,
                        jnp.asarray(example_offset, jnp.int32), num_image_tokens=num_image_tokens,
                        num_classes=num_classes, codebook_size=codebook_size,
                        cfg_scale=None if not _uses_cfg(cfg_scale) else float(cfg_scale),
                        temperature=float(temperature), top_k=int(top_k or 0),
                        top_p=1.0 if top_p is None else float(top_p))


def sample_full_recompute(model, variables, labels, *, num_image_tokens: int, num_classes: int,
                          codebook_size: int, rng, cfg_scale: float | None = 1.75,
                          temperature: float = 1.0, top_k: int = 600, top_p: float = 0.92,
                          example_offset: int = 0) -> jax.Array:
  """The reference path: the same sampling, recomputing the whole prefix at every step (no cache)."""
  labels = jnp.asarray(labels, jnp.int32)
  b = labels.shape[0]
  cfg = _uses_cfg(cfg_scale)
  first = jnp.concatenate([labels, jnp.full((b,), num_classes)]) if cfg else labels
  seq = jnp.zeros((first.shape[0], 1 + num_image_tokens), jnp.int32).at[:, 0].set(first)
  keys = _example_keys(rng, b, jnp.asarray(example_offset, jnp.int32))
  lo = num_classes + 1
  forward = jax.jit(lambda v, s: model.apply(v, s))
  out = []
  for i in range(num_image_tokens):
    logits = forward(variables, seq)[:, i, lo:lo + codebook_size]
    l = guided_logits(logits, b, cfg_scale if cfg else None)
    tok = _pick(l, jax.vmap(lambda k: jax.random.fold_in(k, i))(keys), temperature,
                int(top_k or 0), 1.0 if top_p is None else top_p)
    out.append(tok)
    nxt = tok + lo
    seq = seq.at[:, i + 1].set(jnp.concatenate([nxt, nxt]) if cfg else nxt)
  return jnp.stack(out, axis=1)
