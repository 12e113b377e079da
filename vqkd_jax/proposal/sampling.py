"""Sampling image tokens from the AR transformer (upstream §5.3).

Per step: logits of the image-token slice [C + 1, C + 1 + K); classifier-free guidance on logits
(rows [cond; uncond], uncond + scale * (cond - uncond)); temperature; top-k; top-p (nucleus, as
transformers' top_k_top_p_filtering); a categorical draw (temperature 0: argmax), or the filters
and the draw as one kernel on the same noise (`draw="pallas"`, nn/filtered_draw.py; the default
"auto" on GPUs). The drawn token is appended to both halves of the doubled batch.

`sample` is one jitted program of `lax.fori_loop`s with a KV cache ([B, heads, S, head_dim], the
float parameters cast to the computation dtype once, optionally each block's q / k / v and gate /
up kernels fused into one kernel each (`decode_kernels`, `ar.fuse_for_decoding`)). Each step's
attention is as the model's `decode_step` says: on GPUs by default one Pallas kernel that turns
q / k by the rotary, writes the cache and reads only its filled part (nn/decode_attention.py), in
one loop; with the einsums, `cache_segments` loops, each attending to the part of the cache
filled by its end. `sample_full_recompute` is the reference path recomputing the whole prefix
each step, and draws exactly the same tokens.

Text-to-image (proposal/t2i.py): `sample_from_prefix` starts from prefix embeddings instead of a class
token (the vocabulary is then the codebook alone); its rows for guidance are [prefix; uncond_prefix].
The prefix is fed into the cache at once, then one image token per step.
`sample_from_prefix_full_recompute` is its reference path. A cross-attention model
(ARTransformer(cross_attention=True)) also takes `context` [B, L, width] with its `context_mask`
and `uncond_context` (guidance rows [context; uncond_context], the latter all real tokens); the
context's keys / values go into the cache with the prefix, once.

Random streams: example i of a call draws from fold_in(fold_in(rng, example_offset + i), step), so a
sample depends on the seed and its index only, not on the batch it was drawn in or the device count.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from vqkd_jax.nn import filtered_draw as filtered_draw_lib
from vqkd_jax.nn import pallas_backend
from vqkd_jax.nn import rms_norm as rms_norm_lib
from vqkd_jax.parallel import xla_options
from vqkd_jax.proposal import ar as ar_lib


# ----------------------------------------------------------------------------------------------
# Filters and guidance (on [B, V] logits).

def top_k_filter(logits: jax.Array, top_k: int | None) -> jax.Array:
  """Keeps the logits >= the k-th largest (ties kept), sets the rest to -inf. 0/None keeps all."""
  if not top_k or top_k >= logits.shape[-1]:
    return logits
  kth = jax.lax.top_k(logits, int(top_k))[0][..., -1:]
  return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_filter(logits: jax.Array, top_p: float | None) -> jax.Array:
  """Nucleus filter with transformers' semantics: sorted ascending, a token is removed when the
  cumulative probability up to and including it is <= 1 - top_p; the most probable token is always
  kept. Keeps the smallest set of most probable tokens whose total probability is >= top_p.
  None or >= 1 keeps all."""
  if top_p is None or top_p >= 1.0:
    return logits
  order = jnp.argsort(logits, axis=-1)                                   # ascending
  sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
  cum = jnp.cumsum(jax.nn.softmax(sorted_logits.astype(jnp.float32), axis=-1), axis=-1)
  remove_sorted = (cum <= 1.0 - top_p).at[..., -1].set(False)
  rows = jnp.arange(logits.shape[0])[:, None]
  remove = jnp.zeros_like(remove_sorted).at[rows, order].set(remove_sorted)
  return jnp.where(remove, -jnp.inf, logits)


def top_k_top_p_filter(logits: jax.Array, top_k: int | None = 0,
                       top_p: float | None = 1.0) -> jax.Array:
  """top-k then top-p (transformers' top_k_top_p_filtering with min_tokens_to_keep=1): [B, V].

  With both filters on, the nucleus is found among the k largest logits that top-k already returns
  sorted, instead of by a second sort of all V: token j of the descending order is kept when the
  probabilities of the tokens before it sum to less than top_p (the same set as the ascending
  cumulative rule, 1 - that sum <= 1 - top_p removes). The filtered set's normaliser is summed over
  all V, so ties at the k-th value (kept by top-k) count. Ties at the nucleus boundary are all kept.
  At V = 16,384 and k = 600 this made AR sampling 2-3% faster than that sort and scatter (H200,
  Llama medium, batch 64: 137 -> 140 img/s with CFG, 186 -> 192 without).
  """
  v = logits.shape[-1]
  if not top_k or top_k >= v or top_p is None or top_p >= 1.0:
    return top_p_filter(top_k_filter(logits, top_k), top_p)
  top = jax.lax.top_k(logits, int(top_k))[0]                              # descending [B, k]
  logits = jnp.where(logits < top[..., -1:], -jnp.inf, logits)
  top = top.astype(jnp.float32)
  z = jnp.sum(jnp.exp(logits.astype(jnp.float32) - top[..., :1]), axis=-1, keepdims=True)
  p = jnp.exp(top - top[..., :1]) / z
  before = jnp.cumsum(p, axis=-1) - p
  kept = jnp.maximum(jnp.sum(before < top_p, axis=-1, keepdims=True), 1)
  threshold = jnp.take_along_axis(top, kept - 1, axis=-1).astype(logits.dtype)
  return jnp.where(logits < threshold, -jnp.inf, logits)


def uses_cfg(cfg_scale: float | None) -> bool:
  return cfg_scale is not None and float(cfg_scale) != 1.0


def cfg_combine(cond: jax.Array, uncond: jax.Array, cfg_scale: float) -> jax.Array:
  """Classifier-free guidance on logits: uncond + scale * (cond - uncond)."""
  return uncond + cfg_scale * (cond - uncond)


def guided_logits(logits: jax.Array, batch: int, cfg_scale: float | None) -> jax.Array:
  """Rows [cond (batch); uncond (batch)] -> guided [batch, V]; without CFG the logits unchanged."""
  if not uses_cfg(cfg_scale):
    return logits
  return cfg_combine(logits[:batch], logits[batch:], cfg_scale)


def draw(logits: jax.Array, keys: jax.Array, temperature: float, top_k: int | None,
         top_p: float | None, path: str = "xla") -> jax.Array:
  """One token per row of logits [B, V] with per-row keys [B]: temperature, top-k, top-p, then a
  categorical draw (temperature 0: argmax). int32 [B].

  path "xla": the filters of top_k_top_p_filter, then jax.random.categorical; "pallas": the same
  Gumbel noise (jax.random.gumbel of each row's key, as categorical draws it) and
  nn/filtered_draw.py's kernel, which finds both thresholds without sorting (the same token,
  except where a token's preceding mass is within rounding of top_p; sampling.DRAWS)."""
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if path == "pallas":
    noise = jax.vmap(lambda k: jax.random.gumbel(k, logits.shape[-1:], jnp.float32))(keys)
    return filtered_draw_lib.filtered_draw(logits, noise, int(top_k or 0),
                                           1.0 if top_p is None else float(top_p))
  logits = top_k_top_p_filter(logits, top_k, top_p)
  return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------
# Sampling loops.

def as_variables(params):
  """Accepts either the `params` collection or a full variables dict."""
  return params if "params" in params else {"params": params}


def cast_floats(tree, dtype):
  """Floating leaves to `dtype` once, before a decoding loop: the layers would otherwise cast
  every float32 kernel to the computation dtype again at every step (a quarter of the AR step's
  time in bfloat16 on an H200). The values are those the layers compute with either way."""
  if jnp.dtype(dtype) == jnp.float32:
    return tree
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                      tree)


def _first_tokens(labels, num_classes, cfg):
  if not cfg:
    return labels
  return jnp.concatenate([labels, jnp.full_like(labels, ar_lib.null_class_id(num_classes))])


def _example_keys(rng, batch, offset):
  return jax.vmap(lambda i: jax.random.fold_in(rng, i))(offset + jnp.arange(batch))


def _step_keys(example_keys, step):
  return jax.vmap(lambda k: jax.random.fold_in(k, step))(example_keys)


def _choose(logits, b, example_keys, step, lo, codebook_size, cfg_scale, temperature, top_k,
            top_p, draw_path="xla"):
  """Logits of the rows (cond; uncond) at one position [rows, V] -> image codes [b] in [0, K)."""
  image = logits[:, lo:lo + codebook_size]
  return draw(guided_logits(image, b, cfg_scale), _step_keys(example_keys, step), temperature,
              top_k, top_p, draw_path)


def default_cache_segments(num_image_tokens: int, attention_path: str = "xla") -> int:
  """Decoding loops of a sampling call when `cache_segments` is None. With the einsum attention
  (the model's decode_step_path() "xla"), one per 64 image tokens, at most 4. H200, Llama
  medium, 256 tokens, batch 64 with CFG: 4 loops 136 images/s, one 113, the first call 23 s
  against 5 s (`vqkd bench sample`); short sequences (the demo's, the tests') read little cache
  and keep one loop body to compile. With the Pallas kernel, which reads only the filled cache,
  one."""
  if attention_path == "pallas":
    return 1
  return max(1, min(4, num_image_tokens // 64))


def _grow_cache(cache, length):
  """The self-attention keys / values of every layer ([B, H, S, hd]) zero-padded to `length`
  positions (a cross-attention layer's context keys / values unchanged)."""
  pad = lambda a: jnp.pad(a, ((0, 0), (0, 0), (0, length - a.shape[2]), (0, 0)))
  return [(pad(k), pad(v), *rest) for k, v, *rest in cache]


def _segmented_fori_loop(lo, hi, body, carry, *, cache_length, segments):
  """jax.lax.fori_loop(lo, hi, body, carry) whose carry[0] is a KV cache, run as `segments`
  consecutive loops: the one over steps [a, b) sees a cache of cache_length(b) positions, those
  filled by then, so that attention does not read the empty rest (on average half the cache,
  the largest part of an AR step at 256 tokens). The cache grows between the loops; one loop
  body per segment is compiled."""
  bounds = sorted({lo + round((hi - lo) * k / max(1, segments)) for k in range(segments + 1)})
  for a, b in zip(bounds[:-1], bounds[1:]):
    carry = (_grow_cache(carry[0], cache_length(b)), *carry[1:])
    carry = jax.lax.fori_loop(a, b, body, carry)
  return carry


def _decoding_variables(model, variables, fuse: bool, fold_norms: bool):
  """The sampler's copy of the variables: the kernels fused for decoding if `fuse` (in float32;
  with `fold_norms`, a Llama's second RMSNorm scale folded into gate / up where its steps run the
  Pallas kernels: DECODE_KERNELS "folded"), then the floats cast to the model's dtype once."""
  if fuse:
    fold = (fold_norms and model.flavour == "llama" and model.decode_step_path() == "pallas"
            and rms_norm_lib.fits(model.width))
    variables = ar_lib.fuse_for_decoding(variables, fold_norms=("norm2",) if fold else False)
  return cast_floats(variables, model.dtype)


_CACHED_STATIC = ("model", "num_image_tokens", "num_classes", "codebook_size", "cfg_scale",
                  "temperature", "top_k", "top_p", "cache_segments", "fuse", "fold_norms",
                  "draw_path", "batch_split")


def _sample_cached_impl(model, variables, labels, rng, example_offset, *, num_image_tokens,
                        num_classes, codebook_size, cfg_scale, temperature, top_k, top_p,
                        cache_segments, fuse, fold_norms, draw_path, batch_split):
  variables = _decoding_variables(model, variables, fuse, fold_norms)
  keys = _example_keys(rng, labels.shape[0], example_offset)

  def decode(variables, labels, keys):
    b = labels.shape[0]
    first = _first_tokens(labels, num_classes, uses_cfg(cfg_scale))
    lo = ar_lib.image_token_offset(num_classes)
    # Positions 0 .. N-1 are fed (class, then image tokens 0 .. N-2); the last token is never
    # fed. Step i feeds position i: after the steps < b the cache holds b positions.
    cache = model.init_cache(first.shape[0], length=1)

    def body(i, carry):
      cache, inp, out = carry
      logits, cache = model.apply(variables, inp[:, None], positions=i[None], cache=cache)
      tok = _choose(logits[:, 0], b, keys, i, lo, codebook_size, cfg_scale, temperature, top_k,
                    top_p, draw_path)
      out = jax.lax.dynamic_update_slice(out, tok[:, None], (0, i))
      nxt = tok + lo
      return cache, (jnp.concatenate([nxt, nxt]) if uses_cfg(cfg_scale) else nxt), out

    out = jnp.zeros((b, num_image_tokens), jnp.int32)
    _, _, out = _segmented_fori_loop(0, num_image_tokens, body, (cache, first, out),
                                     cache_length=lambda end: end, segments=cache_segments)
    return out

  return _on_each_device(decode, batch_split, (variables, labels, keys), (False, True, True))


def batch_split(labels):
  """(mesh, mesh axes) when `labels` is a jax.Array whose batch (axis 0) is split over several
  devices of a mesh by a NamedSharding; else None. `sample` then runs its decoding loop on each
  device's rows (shard_map): data-parallel sampling, the same tokens as on one device."""
  sharding = getattr(labels, "sharding", None)
  if not isinstance(sharding, NamedSharding) or not sharding.spec or sharding.spec[0] is None:
    return None
  axes = sharding.spec[0]
  size = math.prod(sharding.mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,)))
  return (sharding.mesh, axes) if size > 1 else None


def _on_each_device(decode, batch_split, args: tuple, per_row: tuple):
  """decode(*args) over all rows (batch_split None), or on each device's rows of batch_split's
  mesh (shard_map): the arguments flagged in per_row split by their rows, the others (the
  variables, shared rows) replicated. Each device decodes its rows with the whole model: no
  communication in the loop, and the Pallas kernels (custom calls XLA cannot partition) see only
  the local rows."""
  if batch_split is None:
    return decode(*args)
  mesh, axes = batch_split
  specs = tuple(P(axes) if split else P() for split in per_row)
  return jax.shard_map(decode, mesh=mesh, in_specs=specs, out_specs=P(axes),
                       check_vma=False)(*args)


_sample_cached_plain = jax.jit(_sample_cached_impl, static_argnames=_CACHED_STATIC)
_sample_cached_cublas = xla_options.jit_with_options(_sample_cached_impl, xla_options.CUBLAS_GEMMS,
                                                     static_argnames=_CACHED_STATIC)

# How a decoding step computes its projections (`sample(decode_kernels=...)`): "separate" as the
# model is trained (XLA's dot merger may fuse q/k/v and gate/up itself, concatenating the weights
# in the loop), "fused" with ar.fuse_for_decoding's kernels laid out once before the loop, and
# "fused_cublas" the same through cuBLAS GEMMs (xla_options.CUBLAS_GEMMS) instead of Triton.
# The same tokens on every path in tests/test_ar.py (CPU, float32, random weights everywhere). The
# H100 checks in bfloat16 recorded here and below (Llama medium, CFG, batch 64, one seed) ran with
# the zero-initialised Llama head: every logit was 0 and the tokens came from the noise alone, so
# they did not test the layouts' numerics (found 6 Dec 2026; `vqkd bench sample` now draws that head
# at random). A GPU's GEMMs round bf16 differently between layouts: with the head drawn at random
# (H100, 6 Dec 2026, `vqkd bench sample`'s "same tokens", seed 0, against folded) fused_cublas gave
# 0.529 / 0.568 of folded's tokens (CFG 1.75 / none) and separate 0.558 / 0.616: the samples part
# where a rounding difference tips a draw (about halfway through an image on average), as expected
# of equal functions in bf16; a wrong layout would part at the first tokens. Measured there (5 Dec
# 2026, `vqkd bench sample`, images/s with CFG 1.75 / without) with the Pallas decoding step
# (model.decode_step): separate 137 / 188, fused 145 / 205, fused_cublas 167 / 212; with XLA's ops
# (the einsum attention in 4 cache segments) 123 / 184, 125 / 186, 142 / 181. "folded", the default,
# is fused_cublas with a Llama's second RMSNorm scale folded into the gate / up kernel where the
# steps run the Pallas kernels (ar.fuse_for_decoding(fold_norms=("norm2",))): the block's norm2
# kernel and SwiGLU fusion become one kernel (rms_norm.rms_scaled_swiglu) on the GEMM's float32
# output; elsewhere (other models, XLA's step) it is fused_cublas. On three H100s (6 Dec 2026, Llama
# medium, CFG, batch 64, Pallas step and draw, each pair in one process): 362.3 against 365.9, 370.1
# against 371.5 and 365.0 against 366.0 ms per batch (equal within rounding in tests/test_ar.py; the
# equal tokens of those runs are void: the zero head above). Folding both norms (norm1 too, its
# rows' rsqrt then applied in the attention kernel) was slower on an H100 (5 Dec): 376.9 against
# 365.7 ms, the attention kernel taking 1.8 us more per layer and step with the norm inside.
DECODE_KERNELS = ("separate", "fused", "fused_cublas", "folded")
# How a step draws its token (`sample(draw=...)`): "xla", top_k_top_p_filter's sort and
# jax.random.categorical; "pallas", nn/filtered_draw.py's kernel on the same Gumbel noise (the same
# tokens); "auto", the kernel on GPUs and XLA's ops elsewhere (Pallas' interpret mode is slow).
# Measured on an H100 (Llama medium, batch 64 with CFG, 256 tokens, bf16, fused_cublas and the
# Pallas step): 365.7 against 372.3 ms per batch, 175.0 against 171.9 images/s (the same tokens
# with equal logits there; tests/test_filtered_draw.py checks the kept sets and draws); the
# kernel takes 22.7 us per step where the sort and the filters took 50 us. With the head drawn at
# random (H100, 6 Dec 2026, folded layout): the same tokens as XLA's draw (1.000, with CFG and
# without), 363 against 372 ms per batch with CFG, 280 against 289 without.
DRAWS = ("auto", "xla", "pallas")


def resolve_draw(draw: str) -> str:
  """"xla" or "pallas" of a `draw` setting (one of DRAWS); "auto": the kernel where the Pallas
  kernels compile (`pallas_backend.kernels_supported`)."""
  if draw not in DRAWS:
    raise ValueError(f"draw must be one of {DRAWS}, got {draw!r}")
  if draw == "auto":
    return "pallas" if pallas_backend.kernels_supported() else "xla"
  return draw


def _decoding_options(decode_kernels: str, draw: str) -> tuple[bool, bool, str]:
  """(fuse, fold_norms, draw path) of `sample`'s decode_kernels and draw, checked."""
  if decode_kernels not in DECODE_KERNELS:
    raise ValueError(f"decode_kernels must be one of {DECODE_KERNELS}, got {decode_kernels!r}")
  return decode_kernels != "separate", decode_kernels == "folded", resolve_draw(draw)


def _uses_cublas(decode_kernels: str) -> bool:
  return decode_kernels in ("fused_cublas", "folded")


def _sample_cached(*args, decode_kernels, draw, **kwargs):
  fuse, fold_norms, draw_path = _decoding_options(decode_kernels, draw)
  run = _sample_cached_cublas if _uses_cublas(decode_kernels) else _sample_cached_plain
  return run(*args, fuse=fuse, fold_norms=fold_norms, draw_path=draw_path, **kwargs)


def _static_args(cfg_scale, temperature, top_k, top_p, codebook_size):
  """Normalised static arguments (one compilation per distinct sampling rule)."""
  greedy = float(temperature) == 0.0
  top_k = min(int(top_k or 0), codebook_size)
  return dict(cfg_scale=float(cfg_scale) if uses_cfg(cfg_scale) else None,
              temperature=float(temperature),
              top_k=0 if greedy or top_k >= codebook_size else top_k,
              top_p=1.0 if greedy or top_p is None else min(float(top_p), 1.0))


def sample(model: ar_lib.ARTransformer, params, labels, *, num_image_tokens: int,
           num_classes: int, codebook_size: int, rng: jax.Array,
           cfg_scale: float | None = 1.75, temperature: float = 1.0, top_k: int | None = 600,
           top_p: float | None = 0.92, example_offset: int = 0,
           cache_segments: int | None = None, decode_kernels: str = "folded",
           draw: str = "auto") -> jax.Array:
  """Image code indices int32 [B, num_image_tokens] in [0, codebook_size) for class labels [B].

  params: the model's `params` collection (or its full variables dict). cfg_scale None or 1 turns
  guidance (and the doubled batch) off; top_k 0/None and top_p 1/None turn the filters off;
  temperature 0 is greedy. example_offset: index of labels[0] in a larger set (per-example keys).
  Labels whose batch is split over devices by a NamedSharding (`batch_split`) are sampled on
  each device's rows, with the parameters replicated; the tokens are the same.
  One jitted program: the float parameters cast to the model's dtype once, then fori_loops over
  the tokens with a KV cache, `cache_segments` of them, each attending only to the part of the
  cache filled by its end (1: one loop over a full-length cache; more compile a loop body each;
  None: default_cache_segments, 1 with model.decode_step's Pallas kernel, which reads only
  the filled cache anyway). decode_kernels: one of DECODE_KERNELS (the same tokens; "folded",
  the default, within rounding). draw: one of DRAWS (the same tokens).
  """
  if num_image_tokens + 1 > model.seq_len:
    raise ValueError(f"{num_image_tokens} image tokens do not fit seq_len {model.seq_len}")
  split = batch_split(labels)
  return _sample_cached(model, as_variables(params), jnp.asarray(labels, jnp.int32), rng,
                        jnp.asarray(example_offset, jnp.int32), num_image_tokens=num_image_tokens,
                        num_classes=num_classes, codebook_size=codebook_size,
                        cache_segments=int(cache_segments or default_cache_segments(
                            num_image_tokens, model.decode_step_path())),
                        decode_kernels=decode_kernels, draw=draw, batch_split=split,
                        **_static_args(cfg_scale, temperature, top_k, top_p, codebook_size))


def sample_full_recompute(model: ar_lib.ARTransformer, params, labels, *, num_image_tokens: int,
                          num_classes: int, codebook_size: int, rng: jax.Array,
                          cfg_scale: float | None = 1.75, temperature: float = 1.0,
                          top_k: int | None = 600, top_p: float | None = 0.92,
                          example_offset: int = 0) -> jax.Array:
  """The reference path of `sample` (same arguments and random streams): no cache, the full forward
  over the whole prefix at every step (a Python loop; slow, for tests)."""
  static = _static_args(cfg_scale, temperature, top_k, top_p, codebook_size)
  variables = as_variables(params)
  labels = jnp.asarray(labels, jnp.int32)
  b = labels.shape[0]
  cfg = uses_cfg(static["cfg_scale"])
  first = _first_tokens(labels, num_classes, cfg)
  lo = ar_lib.image_token_offset(num_classes)
  keys = _example_keys(rng, b, jnp.asarray(example_offset, jnp.int32))
  seq = jnp.zeros((first.shape[0], num_image_tokens), jnp.int32).at[:, 0].set(first)

  @jax.jit
  def step(seq, i):
    logits = model.apply(variables, seq)
    return _choose(jnp.take(logits, i, axis=1), b, keys, i, lo, codebook_size, **static)

  out = []
  for i in range(num_image_tokens):
    tok = step(seq, jnp.asarray(i, jnp.int32))
    out.append(tok)
    if i + 1 < num_image_tokens:
      nxt = tok + lo
      seq = seq.at[:, i + 1].set(jnp.concatenate([nxt, nxt]) if cfg else nxt)
  return jnp.stack(out, axis=1)


# ----------------------------------------------------------------------------------------------
# Sampling from prefix embeddings (text-to-image; vocabulary = codebook, token t has id t).

def guidance_prefix_rows(prefix, uncond_prefix, cfg):
  """The prefix rows of a sampling call: [prefix; uncond_prefix (broadcast)] with guidance, else
  the prefix (the AR and the NAR text-conditioned samplers)."""
  if not cfg:
    return prefix
  if uncond_prefix is None:
    raise ValueError("classifier-free guidance (cfg_scale != 1) needs uncond_prefix")
  return jnp.concatenate([prefix, jnp.broadcast_to(uncond_prefix, prefix.shape)])


def guidance_context_rows(context, context_mask, uncond_context, cfg):
  """(context rows, mask rows) of a cross-attention model: [context; uncond_context] and [mask;
  all real] with guidance; (None, None) without a context."""
  if context is None:
    return None, None
  mask = (jnp.ones(context.shape[:2], bool) if context_mask is None
          else jnp.asarray(context_mask, bool))
  if not cfg:
    return context, mask
  if uncond_context is None:
    raise ValueError("classifier-free guidance (cfg_scale != 1) of a cross-attention model needs "
                     "uncond_context")
  return (jnp.concatenate([context, jnp.broadcast_to(uncond_context, context.shape)]),
          jnp.concatenate([mask, jnp.ones_like(mask)]))


_PREFIX_STATIC = ("model", "num_image_tokens", "codebook_size", "cfg_scale", "temperature",
                  "top_k", "top_p", "cache_segments", "fuse", "fold_norms", "draw_path",
                  "batch_split")


def _sample_prefix_impl(model, variables, prefix, uncond_prefix, rng, example_offset, *,
                        num_image_tokens, codebook_size, cfg_scale, temperature, top_k, top_p,
                        cache_segments, fuse, fold_norms, draw_path, batch_split=None,
                        context=None, context_mask=None, uncond_context=None):
  variables = _decoding_variables(model, variables, fuse, fold_norms)
  cfg = uses_cfg(cfg_scale)
  keys = _example_keys(rng, prefix.shape[0], example_offset)

  def decode(variables, prefix, uncond_prefix, context, context_mask, uncond_context, keys):
    b, p = prefix.shape[:2]
    rows = guidance_prefix_rows(prefix, uncond_prefix, cfg)
    context, context_mask = guidance_context_rows(context, context_mask, uncond_context, cfg)
    choose = lambda logits, i: _choose(logits, b, keys, i, 0, codebook_size, cfg_scale,
                                       temperature, top_k, top_p, draw_path)
    # Positions 0 .. P-1 hold the prefix, P .. P+N-2 the image tokens 0 .. N-2 (the last never
    # fed). Step i >= 1 feeds position P + i - 1: after the steps < b the cache holds P + b - 1.
    cache = model.init_cache(rows.shape[0], length=p,
                             **({} if context is None else {"context_length": context.shape[1]}))
    logits, cache = model.apply(variables, jnp.zeros((rows.shape[0], 0), jnp.int32),
                                positions=jnp.arange(p), cache=cache, prefix=rows,
                                context=context, context_mask=context_mask)
    first = choose(logits[:, -1], 0)
    out = jnp.zeros((b, num_image_tokens), jnp.int32).at[:, 0].set(first)

    def body(i, carry):
      cache, tok, out = carry
      inp = jnp.concatenate([tok, tok]) if cfg else tok
      logits, cache = model.apply(variables, inp[:, None], positions=(p + i - 1)[None],
                                  cache=cache, context_mask=context_mask)
      tok = choose(logits[:, 0], i)
      return cache, tok, jax.lax.dynamic_update_slice(out, tok[:, None], (0, i))

    _, _, out = _segmented_fori_loop(1, num_image_tokens, body, (cache, first, out),
                                     cache_length=lambda end: p + end - 1,
                                     segments=cache_segments)
    return out

  # The unconditional rows are split only when given per row ([B, P, width], [B, L, width]).
  per_caption = lambda a: a is not None and a.ndim == 3
  return _on_each_device(
      decode, batch_split,
      (variables, prefix, uncond_prefix, context, context_mask, uncond_context, keys),
      (False, True, per_caption(uncond_prefix), True, True, per_caption(uncond_context), True))


_sample_prefix_plain = jax.jit(_sample_prefix_impl, static_argnames=_PREFIX_STATIC)
_sample_prefix_cublas = xla_options.jit_with_options(_sample_prefix_impl, xla_options.CUBLAS_GEMMS,
                                                     static_argnames=_PREFIX_STATIC)


def _check_prefix_args(model, prefix, num_image_tokens, codebook_size):
  if prefix.ndim != 3 or prefix.shape[-1] != model.width:
    raise ValueError(f"prefix must be [B, P, {model.width}], got {prefix.shape}")
  if prefix.shape[1] + num_image_tokens - 1 > model.seq_len:
    raise ValueError(f"a prefix of {prefix.shape[1]} and {num_image_tokens} image tokens do not "
                     f"fit seq_len {model.seq_len}")
  if model.vocab_size != codebook_size:
    raise ValueError(f"prefix sampling reads a vocabulary of image codes only: model.vocab_size "
                     f"{model.vocab_size} != codebook_size {codebook_size}")


def sample_from_prefix(model: ar_lib.ARTransformer, params, prefix, *, num_image_tokens: int,
                       codebook_size: int, rng: jax.Array, uncond_prefix=None,
                       cfg_scale: float | None = 1.75, temperature: float = 1.0,
                       top_k: int | None = 600, top_p: float | None = 0.92,
                       example_offset: int = 0, context=None, context_mask=None,
                       uncond_context=None, cache_segments: int | None = None,
                       decode_kernels: str = "folded", draw: str = "auto") -> jax.Array:
  """Image code indices int32 [B, num_image_tokens] in [0, codebook_size) after prefix embeddings
  [B, P, width] (model.vocab_size == codebook_size: image token t has id t).

  uncond_prefix: [B, P, width] or broadcastable ([P, width]), the unconditional rows of guidance
  (the learned null prefix); needed unless cfg_scale is None or 1. Other arguments as `sample`.
  Cross-attention models: context [B, L, width], context_mask bool [B, L] (None: all real) and
  uncond_context ([L, width], all real; needed with guidance).
  One jitted program: the prefix (and the context's keys / values) in one cached forward, then
  the decoding loops over the tokens (`cache_segments`, `decode_kernels` and `draw` as `sample`;
  the prefix's forward runs through the same fused kernels). A prefix whose batch is split over
  devices by a NamedSharding (`batch_split`) is sampled on each device's rows, as `sample` does
  (the context and its mask split the same way); the tokens are the same."""
  prefix = jnp.asarray(prefix)
  _check_prefix_args(model, prefix, num_image_tokens, codebook_size)
  static = _static_args(cfg_scale, temperature, top_k, top_p, codebook_size)
  uncond = None if uncond_prefix is None else jnp.asarray(uncond_prefix, prefix.dtype)
  if not uses_cfg(static["cfg_scale"]):
    uncond = uncond_context = None
  fuse, fold_norms, draw_path = _decoding_options(decode_kernels, draw)
  run = _sample_prefix_cublas if _uses_cublas(decode_kernels) else _sample_prefix_plain
  return run(model, as_variables(params), prefix, uncond, rng,
             jnp.asarray(example_offset, jnp.int32), num_image_tokens=num_image_tokens,
             codebook_size=codebook_size, context=context, context_mask=context_mask,
             uncond_context=uncond_context,
             cache_segments=int(cache_segments or default_cache_segments(
                 num_image_tokens, model.decode_step_path())),
             fuse=fuse, fold_norms=fold_norms, draw_path=draw_path,
             batch_split=batch_split(prefix), **static)


def sample_from_prefix_full_recompute(model: ar_lib.ARTransformer, params, prefix, *,
                                      num_image_tokens: int, codebook_size: int, rng: jax.Array,
                                      uncond_prefix=None, cfg_scale: float | None = 1.75,
                                      temperature: float = 1.0, top_k: int | None = 600,
                                      top_p: float | None = 0.92,
                                      example_offset: int = 0, context=None, context_mask=None,
                                      uncond_context=None) -> jax.Array:
  """The reference path of `sample_from_prefix` (same arguments and random streams): no cache, a
  full forward over prefix + all tokens drawn so far at every step (Python loop; for tests)."""
  prefix = jnp.asarray(prefix)
  _check_prefix_args(model, prefix, num_image_tokens, codebook_size)
  static = _static_args(cfg_scale, temperature, top_k, top_p, codebook_size)
  variables = as_variables(params)
  b, p = prefix.shape[:2]
  cfg = uses_cfg(static["cfg_scale"])
  uncond = None if uncond_prefix is None else jnp.asarray(uncond_prefix)
  rows = guidance_prefix_rows(prefix, uncond, cfg)
  context, context_mask = guidance_context_rows(context, context_mask, uncond_context, cfg)
  keys = _example_keys(rng, b, jnp.asarray(example_offset, jnp.int32))
  seq = jnp.zeros((rows.shape[0], num_image_tokens - 1), jnp.int32)

  @jax.jit
  def step(seq, i):
    logits = model.apply(variables, seq, prefix=rows, context=context,
                         context_mask=context_mask)             # [rows, P + N - 1, V]
    return _choose(jnp.take(logits, p - 1 + i, axis=1), b, keys, i, 0, codebook_size, **static)

  out = []
  for i in range(num_image_tokens):
    tok = step(seq, jnp.asarray(i, jnp.int32))
    out.append(tok)
    if i + 1 < num_image_tokens:
      seq = seq.at[:, i].set(jnp.concatenate([tok, tok]) if cfg else tok)
  return jnp.stack(out, axis=1)
