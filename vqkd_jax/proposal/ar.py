"""Decoder-only transformer for class-conditional token generation (upstream §5.1-5.2).

Two flavours:
  "gpt2":  learned positions, LayerNorm, GELU (tanh approximation, GPT-2's "gelu_new"), biases,
           residual projections initialised with std 0.02 / sqrt(2 * depth); untied head by default
           (`tie_embeddings=True` reuses the token embedding, as upstream's GPT-2).
  "llama": RMSNorm, SwiGLU MLP, rotary positions (half-split layout, as Hugging Face Llama), no
           biases, untied head initialised to zero. `rope="1d"` rotates by the sequence position;
           `rope="2d"` (LlamaGen's 2-D RoPE) by each image token's (row, col) on the `grid`.

Decoding uses an explicit KV cache: `init_cache(batch)` gives per layer (k, v) of
[B, heads, S, head_dim]; `apply(variables, tokens [B, T], positions=[T], cache=cache)` writes this
call's keys/values at `positions` (contiguous, T >= 1) and returns (logits, new cache). The sampling
loop (proposal/sampling.py) threads the cache through one jitted `lax.fori_loop`.

Sequence layout: [class] + image tokens in raster order. Vocabulary: classes [0, C), the null class C
(classifier-free guidance), image token t -> C + 1 + t; vocab_size = C + 1 + codebook_size.

Conditioning (text-to-image, proposal/t2i.py), by prefix or by cross-attention. Prefix: `prefix`
embeddings [B, P, width] are placed ahead of the token embeddings (positions 0 .. P-1, the tokens at
P ..); attention stays causal over the whole sequence, so every token sees the whole prefix. The
prefix can be fed once into the cache (`tokens` [B, 0]) and decoding continues from position P.
Cross-attention (`cross_attention=True`): each block attends, after its causal self-attention, to a
`context` [B, L, width] under its padding mask; the context's keys / values of every block are
computed once into the KV cache.

2-D rotary positions (`rope="2d"`, llama only; `rotary_2d`): the head dimension is split in two
halves, the first rotated by the token's grid row, the second by its column, each half as 1-D RoPE
of dimension D/2 (frequencies theta^(-2i/(D/2)), i < D/4: LlamaGen's `precompute_freqs_cis_2d`;
within a half the pairs are (x_i, x_{i+D/4}) as Hugging Face's half-split layout rather than
LlamaGen's interleaved pairs, a fixed permutation of the projection's columns). With
`grid` = (h, w) and P = seq_len - h w leading non-image tokens (the class token, or a T2I prefix),
sequence position p >= P holds image token p - P at (row, col) = divmod(p - P, w); the P leading
positions are at (0, 0), i.e. not rotated. (LlamaGen instead gives its class / caption positions
cos = sin = 0, which zeroes their queries and keys; not copied.) Positions stay sequence positions
everywhere (the causal mask, the KV cache, the sampling loops); the model maps them to the grid.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from vqkd_jax.nn import decode_attention as decode_attention_lib
from vqkd_jax.nn import logits as logits_lib
from vqkd_jax.nn import rms_norm as rms_norm_lib
from vqkd_jax.nn.attention import (dense_init, output_projection, qkv_params, qkv_projection,
                                   use_cudnn)
from vqkd_jax.nn.cross_attention import CrossAttention

Dtype = Any
Cache = Sequence[tuple[jax.Array, jax.Array]]
FLAVOURS = ("gpt2", "llama")


# ----------------------------------------------------------------------------------------------
# Sequence layout.

def null_class_id(num_classes: int) -> int:
  """The id of the null (unconditional) class token: num_classes."""
  return num_classes


def image_token_offset(num_classes: int) -> int:
  """Image token t has id t + image_token_offset(num_classes) = t + num_classes + 1."""
  return num_classes + 1


def vocab_size(num_classes: int, codebook_size: int) -> int:
  """classes + null class + image codes."""
  return num_classes + 1 + codebook_size


def class_token_ids(labels: jax.Array, num_classes: int, drop_prob: float = 0.0,
                    rng: jax.Array | None = None) -> jax.Array:
  """int32 [B] class tokens; with probability drop_prob per example the null class (CFG dropout)."""
  labels = jnp.asarray(labels).astype(jnp.int32)
  if drop_prob > 0:
    if rng is None:
      raise ValueError("class dropout (drop_prob > 0) needs an rng")
    drop = jax.random.bernoulli(rng, drop_prob, labels.shape)
    labels = jnp.where(drop, null_class_id(num_classes), labels)
  return labels


def image_token_ids(image_tokens: jax.Array, num_classes: int) -> jax.Array:
  """Code indices [B, N] in [0, codebook_size) -> vocabulary ids (shifted by num_classes + 1)."""
  return jnp.asarray(image_tokens).astype(jnp.int32) + image_token_offset(num_classes)


def make_sequence(labels: jax.Array, image_tokens: jax.Array, num_classes: int,
                  drop_prob: float = 0.1, rng: jax.Array | None = None) -> jax.Array:
  """labels [B], code indices [B, N] (or [B, h, w], raster order) -> int32 [B, 1 + N]:
  [class or null] + image ids. Pass drop_prob=0 for evaluation."""
  image_tokens = jnp.asarray(image_tokens).reshape(image_tokens.shape[0], -1)
  cls = class_token_ids(labels, num_classes, drop_prob, rng)
  return jnp.concatenate([cls[:, None], image_token_ids(image_tokens, num_classes)], axis=1)


def token_nll(logits: jax.Array, seq: jax.Array) -> jax.Array:
  """Per-target negative log-likelihood [B, L-1] (nats, full vocabulary) of seq[:, 1:] under
  logits[:, :-1] ([B, L, V])."""
  return optax.softmax_cross_entropy_with_integer_labels(
      logits[:, :-1].astype(jnp.float32), seq[:, 1:])


def next_token_loss(logits: jax.Array, seq: jax.Array) -> jax.Array:
  """Mean cross-entropy (full vocabulary) of predicting seq[:, 1:] from logits[:, :-1] (HF causal-LM
  loss; with the layout above the targets are exactly the image tokens)."""
  return token_nll(logits, seq).mean()


def perplexity(logits: jax.Array, seq: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """exp(mean NLL over the image-token targets), teacher-forced; `mask` [B] drops padded examples."""
  nll = token_nll(logits, seq)
  if mask is None:
    return jnp.exp(nll.mean())
  w = jnp.broadcast_to(mask.astype(jnp.float32)[:, None], nll.shape)
  return jnp.exp(jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0))


# ----------------------------------------------------------------------------------------------
# Fused kernels for decoding.

DECODE = "decode"   # the variable collection of `fuse_for_decoding`'s kernels


HEAD_MULTIPLE = logits_lib.VOCAB_MULTIPLE   # output columns of `fuse_for_decoding`'s head


def fuse_for_decoding(variables, fold_norms: bool | tuple[str, ...] = False) -> dict:
  """Variables for a decoding loop: each block's query / key / value kernels stacked into one
  `qkv` [D, 3, heads, hd] (biases `qkv_bias` [3, heads, hd]) and, in Llama, gate / up into one
  `gate_up` [D, 2, F], in the collection DECODE; the originals are left out of `params`. The
  output head (or the tied embedding, transposed) as `head` [D, V'] with zero columns up to a
  multiple of HEAD_MULTIPLE (the logits are sliced back to V).

  A decoding step then runs two GEMMs where it ran five, reading weights laid out once rather
  than merged by the compiler at every step; and the head's GEMM no longer pads its [D, V]
  weight to a multiple of 8 columns at every step (18.8 MB copied per step, 13 us on an H100,
  for V = 9,193). Each output column is the same dot product as before (equal values in the
  CPU float32 tests; a GPU's GEMM may accumulate in another order). Called inside the jitted
  sampler on its copy of the parameters; the parameter tree of the model (and its checkpoints)
  stays as it is.

  fold_norms (Llama; True for both, or the names of those to fold, "norm1" / "norm2"): each
  block's RMSNorm scales multiplied into the kernels that read the norms' output, norm1's into
  `qkv_rms` and norm2's into `gate_up_rms` (in place of `qkv` and `gate_up`; the norms'
  parameters left out). A block then feeds its un-normalised rows to those
  GEMMs and scales their outputs by each row's rsqrt(mean(x^2) + epsilon): in the Pallas
  decoding step inside nn/decode_attention's and nn/rms_norm.rms_scaled_swiglu's kernels, so
  that the two RMSNorm kernels of a step's block are gone; elsewhere (a prefill, XLA's ops) by an
  RMSNorm without scale before the GEMMs. RMSNorm then a projection, reordered: equal within
  rounding (products with the scale rounded once, in the weights)."""
  folds = ("norm1", "norm2") if fold_norms is True else tuple(fold_norms or ())
  if set(folds) - {"norm1", "norm2"}:
    raise ValueError(f"fold_norms names norm1 / norm2, got {fold_norms!r}")
  params = dict(variables["params"])
  fused = {}
  if "head" in params:
    head = params.pop("head")["kernel"]
  else:
    head = params["token_embed"]["embedding"].T
  fused["head"] = logits_lib.padded_kernel(head)
  for name, block in params.items():
    if not name.startswith("block"):
      continue
    block, attn = dict(block), dict(block["attn"])
    parts = [attn.pop(n) for n in ("query", "key", "value")]
    entry = {"attn": {"qkv": jnp.stack([p["kernel"] for p in parts], axis=1)}}
    if "bias" in parts[0]:
      entry["attn"]["qkv_bias"] = jnp.stack([p["bias"] for p in parts])
    block["attn"] = attn
    if "gate" in block and "bias" not in block["gate"]:
      entry["gate_up"] = jnp.stack([block.pop("gate")["kernel"], block.pop("up")["kernel"]],
                                   axis=1)
      scale = lambda norm: block.pop(norm)["scale"]
      if "norm1" in folds:
        entry["attn"] = {"qkv_rms": entry["attn"].pop("qkv") * scale("norm1")[:, None, None, None]}
      if "norm2" in folds:
        entry["gate_up_rms"] = entry.pop("gate_up") * scale("norm2")[:, None, None]
    params[name], fused[name] = block, entry
  return {**variables, "params": params, DECODE: fused}


def _fused_dense(x, kernel, bias, dtype, out_dtype=None):
  """x [..., D] @ kernel [D, ...] (+ bias) as flax's Dense / DenseGeneral compute it (operands in
  `dtype`; the result in out_dtype, default dtype)."""
  x, kernel = jnp.asarray(x, dtype), jnp.asarray(kernel, dtype)
  y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())),
                          preferred_element_type=out_dtype)
  return y if bias is None else y + jnp.asarray(bias, dtype)


def _unscaled_rms_norm(x, eps: float, dtype):
  """RMSNorm without its scale (folded into the next kernel by fuse_for_decoding)."""
  return nn.RMSNorm(epsilon=eps, dtype=dtype, use_scale=False)(x)


# ----------------------------------------------------------------------------------------------
# Layers.

def _norm(flavour: str, name: str, dtype, eps: float, pallas: bool = False):
  """The block's norm; `pallas`: Llama's RMSNorm as nn/rms_norm.py's Pallas kernel (the same
  parameter and result), for decoding steps."""
  init = nn.with_logical_partitioning(nn.initializers.ones, ("norm",))
  if flavour == "llama":
    module = rms_norm_lib.RMSNorm if pallas else nn.RMSNorm
    return module(epsilon=eps, dtype=dtype, name=name, scale_init=init)
  return nn.LayerNorm(epsilon=eps, dtype=dtype, name=name, scale_init=init,
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)))


def _pallas_step(decode_step: str, cache, t: int, width: int, num_heads: int) -> bool:
  """Whether a call of t tokens is a one-token decoding step that runs the Pallas kernels
  (`decode_step` resolved for the head dim by nn/decode_attention.resolve)."""
  return (cache is not None and t == 1
          and decode_attention_lib.resolve(decode_step, width // num_heads) == "pallas")


def _dense(features: int, names: tuple[str, str], name: str, use_bias: bool, dtype,
           std: float = 0.02, init=None):
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, name=name,
                  kernel_init=nn.with_logical_partitioning(init or dense_init(std), names),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, names[1:]))


def _rotary_cos_sin(positions: jax.Array, d: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """cos and sin [T, D/2] of the rotary angles positions x theta^(-2i/D)."""
  freqs = 1.0 / theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d)
  angles = positions.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.cos(angles), jnp.sin(angles)


def rotary(x: jax.Array, positions: jax.Array, theta: float = 10000.0) -> jax.Array:
  """Rotary position embedding of x [B, T, H, D] at positions [T] (half-split layout:
  [x1 cos - x2 sin, x2 cos + x1 sin] with frequencies theta^(-2i/D), as Hugging Face Llama)."""
  cos, sin = _rotary_cos_sin(positions, x.shape[-1], theta)
  cos, sin = cos[None, :, None], sin[None, :, None]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


def _rotary_pairs(x: jax.Array, positions: jax.Array, theta: float = 10000.0) -> jax.Array:
  """`rotary` written without splitting and concatenating: x [B, T, H, D] seen as [..., 2, D/2]
  halves, out = x * cos + reversed halves * (-sin, sin). The same float operations in the same
  order (a - b = a + (-b) exactly): equal values, elementwise ops that fuse into their consumers."""
  d = x.shape[-1]
  cos, sin = _rotary_cos_sin(positions, d, theta)
  cos = cos[None, :, None, None]                                          # [1, T, 1, 1, D/2]
  sin = sin[None, :, None, None] * jnp.array([-1.0, 1.0], jnp.float32)[:, None]
  pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], 2, d // 2)
  out = pairs * cos + jnp.flip(pairs, axis=-2) * sin
  return out.reshape(x.shape).astype(x.dtype)


def grid_positions(positions: jax.Array, grid: tuple[int, int], num_prefix: int
                   ) -> tuple[jax.Array, jax.Array]:
  """Sequence positions [T] -> (rows [T], cols [T]) on the image grid (h, w): position p >= P =
  num_prefix holds image token p - P in raster order at divmod(p - P, w); the P leading positions
  (class token, prefix) are at (0, 0)."""
  image = jnp.maximum(positions.astype(jnp.int32) - num_prefix, 0)
  return image // grid[1], image % grid[1]


def rotary_2d(x: jax.Array, rows: jax.Array, cols: jax.Array, theta: float = 10000.0) -> jax.Array:
  """2-D rotary embedding of x [B, T, H, D] (D divisible by 4): the first half of the head
  dimension rotated by rows [T], the second by cols [T], each as `rotary` of dimension D/2."""
  if x.shape[-1] % 4:
    raise ValueError(f"2-D rotary positions need a head dimension divisible by 4, got "
                     f"{x.shape[-1]}")
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([rotary(x1, rows, theta), rotary(x2, cols, theta)], -1)


ROPES = ("1d", "2d")


class CausalSelfAttention(nn.Module):
  """Causal self-attention [B, T, D] -> [B, T, D] at `positions` [T].

  With `cache` (k, v of [B, H, S, hd]) this call's keys and values are written at positions
  (contiguous from positions[0]) and each query attends to the cached positions <= its own; returns
  (output, new cache). Scores and softmax in float32.

  rope: None (no rotary positions), "1d" (by the sequence position) or "2d" (by the grid row and
  column of `grid_positions(positions, grid, num_prefix)`)."""
  num_heads: int
  use_bias: bool
  rope: str | None
  rope_theta: float = 10000.0
  grid: tuple[int, int] | None = None
  num_prefix: int = 0
  out_init_std: float = 0.02
  dropout: float = 0.0
  implementation: str = "auto"
  dtype: Dtype = jnp.float32
  decode_step: str = "auto"
  norm_eps: float = 1e-5

  @nn.compact
  def __call__(self, x, positions, cache=None, train: bool = False):
    d = x.shape[-1]
    hd = d // self.num_heads
    if self.has_variable(DECODE, "qkv_rms"):
      # fuse_for_decoding(fold_norms=True): x is the block's un-normalised input and the kernel has
      # the RMSNorm's scale (epsilon norm_eps) folded in.
      kernel = self.get_variable(DECODE, "qkv_rms")
      if _pallas_step(self.decode_step, cache, x.shape[1], d, self.num_heads) and \
          rms_norm_lib.fits(d):
        # the projection's float32 rows scaled by the norm in the attention kernel
        qkv = _fused_dense(x, kernel, None, self.dtype, out_dtype=jnp.float32)
        y, ck, cv = decode_attention_lib.append_and_attend_qkv(
            qkv[:, 0], *cache, positions[0], self._rotary_table(positions[:1], hd),
            rms=(x[:, 0], self.norm_eps), dtype=self.dtype)
        return self._out(y[:, None], d), (ck, cv)
      qkv = _fused_dense(_unscaled_rms_norm(x, self.norm_eps, self.dtype), kernel, None,
                         self.dtype)                                    # [B, T, 3, H, hd]
    elif self.has_variable(DECODE, "qkv"):
      # Decoding with `fuse_for_decoding`'s kernels: one [D, 3D] projection; the rotary turns the
      # queries and keys as one [B, T, 2H, hd] array.
      qkv = _fused_dense(x, self.get_variable(DECODE, "qkv"),
                         self.get_variable(DECODE, "qkv_bias") if self.use_bias else None,
                         self.dtype)                                    # [B, T, 3, H, hd]
      if _pallas_step(self.decode_step, cache, x.shape[1], d, self.num_heads):
        # the rotary, the cache write and the attention in one kernel
        y, ck, cv = decode_attention_lib.append_and_attend_qkv(
            qkv[:, 0], *cache, positions[0], self._rotary_table(positions[:1], hd))
        return self._out(y[:, None], d), (ck, cv)
    else:
      qkv = None
    if qkv is not None:
      b, t = qkv.shape[:2]
      qk, v = qkv[:, :, :2].reshape(b, t, 2 * self.num_heads, hd), qkv[:, :, 2]
      qk = self._rotate(qk, positions, pairs=True)
      q, k = qk[:, :, :self.num_heads], qk[:, :, self.num_heads:]
    else:
      # The query / key / value projections' parameters (head_projection's), applied as one matmul
      # (Llama medium training at batch 96 on an H100, one process: 129.2 against 130.9 ms).
      q, k, v = qkv_projection(x, qkv_params(self.num_heads, hd, self.use_bias, d), self.dtype)
      if _pallas_step(self.decode_step, cache, q.shape[1], d, self.num_heads):
        y, ck, cv = decode_attention_lib.append_and_attend(
            q[:, 0], k[:, 0], v[:, 0], *cache, positions[0],
            self._rotary_table(positions[:1], hd))
        return self._out(y[:, None], d), (ck, cv)
      q, k = self._rotate(q, positions), self._rotate(k, positions)
    if cache is None and self._use_cudnn(q, train):
      # Fused flash attention (cuDNN; float32 softmax inside). Positions increase, so the mask
      # kpos <= qpos below is the plain causal mask. cuDNN's backward needs an even length: pad
      # at the end (padded keys follow every real query, so the causal mask hides them).
      t = q.shape[1]
      pad = ((0, 0), (0, -t % 8), (0, 0), (0, 0))
      q, k, v = (jnp.pad(a, pad) for a in (q, k, v))
      y = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
      return self._out(y[:, :t], d), None
    if cache is None:
      kpos = positions
      new_cache, kv = None, "bkhd"
    else:
      # The cache is [B, H, S, hd]: each step's einsums read it in place (a [B, S, H, hd] cache
      # is transposed, a full copy per layer and step).
      ck, cv = cache
      start = (0, 0, positions[0], 0)
      ck = jax.lax.dynamic_update_slice(ck, k.transpose(0, 2, 1, 3).astype(ck.dtype), start)
      cv = jax.lax.dynamic_update_slice(cv, v.transpose(0, 2, 1, 3).astype(cv.dtype), start)
      k, v, new_cache, kv = ck.astype(self.dtype), cv.astype(self.dtype), (ck, cv), "bhkd"
      kpos = jnp.arange(ck.shape[2])
    mask = (kpos[None, :] <= positions[:, None])[None, None]              # [1, 1, T, S]
    scores = jnp.einsum(f"bqhd,{kv}->bhqk", q * jnp.asarray(hd ** -0.5, q.dtype), k,
                        preferred_element_type=jnp.float32)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    weights = nn.Dropout(self.dropout, deterministic=not train)(weights)
    y = jnp.einsum(f"bhqk,{kv}->bqhd", weights, v)
    return self._out(y, d), new_cache

  def _rotary_table(self, positions, hd: int):
    """(cos, sin) float32 [P, hd / (2 P)] of positions [1] for the kernel: P = 1 for "1d" (the
    halves of a head turned together), 2 for "2d" (the first half's quarters by the grid row,
    the second half's by the column); None without rotary positions."""
    if self.rope == "1d":
      return _rotary_cos_sin(positions, hd, self.rope_theta)
    if self.rope == "2d":
      rows, cols = grid_positions(positions, self.grid, self.num_prefix)
      cr, sr = _rotary_cos_sin(rows, hd // 2, self.rope_theta)
      cc, sc = _rotary_cos_sin(cols, hd // 2, self.rope_theta)
      return jnp.concatenate([cr, cc]), jnp.concatenate([sr, sc])
    return None

  def _rotate(self, x, positions, pairs=False):
    """The rotary positions (if any) of queries or keys [B, T, heads, hd]."""
    if self.rope == "1d":
      return (_rotary_pairs if pairs else rotary)(x, positions, self.rope_theta)
    if self.rope == "2d":
      rows, cols = grid_positions(positions, self.grid, self.num_prefix)
      return rotary_2d(x, rows, cols, self.rope_theta)
    return x

  def _out(self, y, d):
    return output_projection(d, self.use_bias, self.dtype, self.out_init_std)(y)

  def _use_cudnn(self, q, train) -> bool:
    # The shared rule (nn/attention.use_cudnn), except that attention dropout needs the einsums.
    return use_cudnn(self.implementation, q, None) and not (train and self.dropout > 0)


class DecoderBlock(nn.Module):
  """Pre-norm block: x + Attn(Norm(x)); x + MLP(Norm(x)). GPT-2 MLP: fc1 - GELU(tanh) - fc2.
  Llama MLP: down(silu(gate(x)) * up(x)).

  cross_attention: a third sublayer between the two, x + CrossAttn(Norm(x), context) over the
  context [B, L, width] with its padding mask [B, L]. Its cache entry is then (k, v, context k,
  context v): a call with `context` computes the context's keys / values and writes them there, a
  call without it reads them."""
  num_heads: int
  mlp_dim: int
  flavour: str
  depth: int
  rope_theta: float = 10000.0
  norm_eps: float = 1e-5
  dropout: float = 0.0
  attention: str = "auto"
  dtype: Dtype = jnp.float32
  rope: str = "1d"
  grid: tuple[int, int] | None = None
  num_prefix: int = 0
  cross_attention: bool = False
  decode_step: str = "auto"

  @nn.compact
  def __call__(self, x, positions, cache=None, train: bool = False, context=None,
               context_mask=None):
    llama = self.flavour == "llama"
    bias = not llama
    std = 0.02 if llama else 0.02 / (2 * self.depth) ** 0.5  # GPT-2 scales residual projections.
    drop = lambda h: nn.Dropout(self.dropout, deterministic=not train)(h)
    pallas_norm = _pallas_step(self.decode_step, cache, x.shape[1], x.shape[-1],
                               self.num_heads) and rms_norm_lib.fits(x.shape[-1])
    norm = lambda name: _norm(self.flavour, name, self.dtype, self.norm_eps, pallas_norm)
    # fuse_for_decoding(fold_norms=...): a folded norm1 / norm2 is applied by the kernels after it
    norm2_folded = self.has_variable(DECODE, "gate_up_rms")
    norm1_folded = self.has_variable(DECODE, "attn") and "qkv_rms" in self.get_variable(DECODE,
                                                                                        "attn")
    h, self_cache = CausalSelfAttention(
        self.num_heads, use_bias=bias, rope=self.rope if llama else None,
        rope_theta=self.rope_theta, grid=self.grid, num_prefix=self.num_prefix, out_init_std=std,
        dropout=self.dropout, implementation=self.attention, dtype=self.dtype,
        decode_step=self.decode_step, norm_eps=self.norm_eps, name="attn")(
            x if norm1_folded else norm("norm1")(x), positions,
            None if cache is None else cache[:2], train)
    x = x + drop(h)
    new_cache = self_cache
    if self.cross_attention:
      cached_kv = None if cache is None or context is not None else (cache[2:] or None)
      h, (ck, cv) = CrossAttention(
          self.num_heads, use_bias=bias, out_init_std=std, implementation=self.attention,
          dtype=self.dtype, name="cross_attn")(
              norm("norm_cross")(x), context,
              context_mask, cached_kv)
      x = x + drop(h)
      if cache is not None:        # the context's keys / values: kept, or written once
        new_cache = (*self_cache, *(cached_kv or (ck.astype(cache[2].dtype),
                                                  cv.astype(cache[3].dtype))))
    down = lambda h: _dense(x.shape[-1], ("mlp", "embed"), "down", bias, self.dtype, std)(h)
    if norm2_folded and pallas_norm:   # the norm, the activation and their roundings in one kernel
      gate_up = _fused_dense(x, self.get_variable(DECODE, "gate_up_rms"), None, self.dtype,
                             out_dtype=jnp.float32)
      h = down(rms_norm_lib.rms_scaled_swiglu(gate_up[:, 0], x[:, 0], self.norm_eps,
                                              self.dtype)[:, None])
    elif norm2_folded:
      gate_up = _fused_dense(_unscaled_rms_norm(x, self.norm_eps, self.dtype),
                             self.get_variable(DECODE, "gate_up_rms"), None, self.dtype)
      h = down(nn.silu(gate_up[..., 0, :]) * gate_up[..., 1, :])
    elif llama and self.has_variable(DECODE, "gate_up"):   # fuse_for_decoding's [D, 2F] kernel
      gate_up = _fused_dense(norm("norm2")(x), self.get_variable(DECODE, "gate_up"), None,
                             self.dtype)
      h = down(nn.silu(gate_up[..., 0, :]) * gate_up[..., 1, :])
    elif llama:
      h = norm("norm2")(x)
      gate = _dense(self.mlp_dim, ("embed", "mlp"), "gate", bias, self.dtype)(h)
      up = _dense(self.mlp_dim, ("embed", "mlp"), "up", bias, self.dtype)(h)
      h = down(nn.silu(gate) * up)
    else:
      h = norm("norm2")(x)
      h = nn.gelu(_dense(self.mlp_dim, ("embed", "mlp"), "fc1", bias, self.dtype)(h),
                  approximate=True)
      h = _dense(x.shape[-1], ("mlp", "embed"), "fc2", bias, self.dtype, std)(h)
    return x + drop(h), new_cache


class ARTransformer(nn.Module):
  """Decoder-only transformer: tokens int [B, T] -> logits float32 [B, T, vocab_size].

  Attributes:
    vocab_size: classes + null + codebook (see `vocab_size()`).
    seq_len: maximum sequence length (1 + number of image tokens); size of the position table and
      of the default KV cache.
    width, depth, num_heads: model width, number of blocks, attention heads (head dim width/heads).
    mlp_ratio: GPT-2 MLP hidden = mlp_ratio * width; Llama SwiGLU hidden = 2/3 of that (8/3 width
      for ratio 4) rounded up to a multiple of `mlp_multiple_of` (1024 -> 2816, as upstream).
    flavour: "gpt2" or "llama".
    dtype: computation dtype (parameters float32; logits always float32).
    dropout: residual/embedding/attention-probability dropout in train mode.
    tie_embeddings: output head = token embedding transposed (GPT-2 only matters; default untied).
    mlp_dim: explicit MLP hidden size, overriding mlp_ratio.
    mlp_multiple_of, rope_theta, norm_eps: Llama details (256, 1e4, 1e-5 as HF defaults).
    rope: Llama's rotary positions, "1d" (sequence position, as HF Llama) or "2d" (LlamaGen's 2-D
      RoPE over `grid`; see the module docstring). GPT-2 has learned positions and takes "1d" only.
    grid: (h, w) of the image tokens, needed by rope="2d": the last h w positions of seq_len are
      the image tokens, the seq_len - h w before them (class token, prefix) sit at (0, 0).
    attention: "xla" (einsums, float32 scores and softmax), "cudnn" (fused flash attention) or
      "auto" (cudnn on GPU in bfloat16/float16 for full sequences without attention dropout, else
      xla). Decoding with a cache uses the einsum path, or `decode_step`'s kernels.
    decode_step: how a decoding step of one token with a cache runs: "xla" (XLA's ops; the
      attention as einsums over the whole cache, masked), "pallas" (Pallas kernels: the attention
      of nn/decode_attention.py, which turns q / k by the rotary, writes the step's key / value
      and reads only the filled cache; Llama's RMSNorms as nn/rms_norm.py's kernel where the width
      is a power of two; with fuse_for_decoding(fold_norms=True)'s kernels, the norms inside the
      attention kernel and nn/rms_norm.rms_scaled_swiglu instead) or "auto" (pallas on GPU with
      a power-of-two head dim, xla elsewhere; the kernels run in Pallas' interpret mode off
      GPUs). `decode_step_path()` says which.
    remat: recompute each block's activations in the backward pass (memory for large batches).
    cross_attention: every block cross-attends to a `context` [B, L, width] (e.g. projected text
      states) after its self-attention; padded context tokens (context_mask False) get no weight.

  Call: `__call__(tokens, train=False, positions=None, cache=None, prefix=None)`; positions [T]
  default arange(T); with `cache` returns (logits, new cache). `prefix` [B, P, width] (embeddings,
  e.g. projected text states) goes ahead of the T token embeddings: positions then cover P + T
  (default arange(P + T)) and the logits are [B, P + T, vocab_size].
  With cross_attention: `context` [B, L, width] and `context_mask` bool [B, L] (None: all real).
  Decoding with a cache (`init_cache(batch, context_length=L)`): the call that passes `context`
  writes its keys / values into the cache once; later calls pass only `context_mask`.
  """
  vocab_size: int
  seq_len: int
  width: int
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  flavour: str = "gpt2"
  dtype: Dtype = jnp.float32
  dropout: float = 0.0
  tie_embeddings: bool = False
  mlp_dim: int | None = None
  mlp_multiple_of: int = 256
  rope_theta: float = 10000.0
  norm_eps: float = 1e-5
  attention: str = "auto"
  remat: bool = False
  rope: str = "1d"
  grid: tuple[int, int] | None = None
  cross_attention: bool = False
  decode_step: str = "auto"

  def mlp_hidden(self) -> int:
    if self.mlp_dim:
      return int(self.mlp_dim)
    hidden = int(self.mlp_ratio * self.width)
    if self.flavour == "llama":
      m = self.mlp_multiple_of
      hidden = -(-int(2 * hidden / 3) // m) * m
    return hidden

  @nn.compact
  def __call__(self, tokens: jax.Array, train: bool = False, positions: jax.Array | None = None,
               cache: Cache | None = None, prefix: jax.Array | None = None,
               context: jax.Array | None = None, context_mask: jax.Array | None = None):
    if self.flavour not in FLAVOURS:
      raise ValueError(f"unknown flavour {self.flavour!r}: one of {FLAVOURS}")
    if self.width % self.num_heads:
      raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
    num_prefix = self._check_rope()
    if self.cross_attention and context is None and cache is None:
      raise ValueError("a cross-attention ARTransformer needs the context (or a cache holding "
                       "its keys / values)")
    if context is not None and not self.cross_attention:
      raise ValueError("context given to an ARTransformer without cross_attention")
    embed = nn.Embed(self.vocab_size, self.width, dtype=self.dtype, name="token_embed",
                     embedding_init=nn.with_logical_partitioning(dense_init(), ("vocab", "embed")))
    x = embed(tokens)
    if prefix is not None:
      x = jnp.concatenate([prefix.astype(x.dtype), x], axis=1)
    t = x.shape[1]
    positions = jnp.arange(t, dtype=jnp.int32) if positions is None else positions
    if self.flavour == "gpt2":
      pos = self.param("pos_embed", nn.with_logical_partitioning(dense_init(0.01), (None, "embed")),
                       (self.seq_len, self.width))
      x = x + jnp.take(pos, positions, axis=0).astype(x.dtype)[None]
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    block = DecoderBlock
    if self.remat and cache is None:
      # (self, x, positions, cache, train, context, context_mask)
      block = nn.remat(DecoderBlock, static_argnums=(4,))
    new_cache = []
    for i in range(self.depth):
      x, c = block(self.num_heads, self.mlp_hidden(), self.flavour, self.depth, self.rope_theta,
                   self.norm_eps, self.dropout, self.attention, self.dtype, rope=self.rope,
                   grid=self.grid, num_prefix=num_prefix, cross_attention=self.cross_attention,
                   decode_step=self.decode_step, name=f"block{i}")(
                       x, positions, None if cache is None else cache[i], train, context,
                       context_mask)
      new_cache.append(c)
    pallas_norm = _pallas_step(self.decode_step, cache, t, self.width,
                               self.num_heads) and rms_norm_lib.fits(self.width)
    x = _norm(self.flavour, "norm_out", self.dtype, self.norm_eps, pallas_norm)(x)
    # Operands in the computation dtype, logits accumulated and returned in float32.
    if self.has_variable(DECODE, "head"):        # fuse_for_decoding's padded head
      head = jnp.asarray(self.get_variable(DECODE, "head"), self.dtype)
      logits = jnp.einsum("btd,dv->btv", x, head,
                          preferred_element_type=jnp.float32)[..., :self.vocab_size]
    elif self.tie_embeddings:
      # nn/logits.py: the backward's matmuls in the computation dtype (Llama medium training on
      # an H100: see the module).
      logits = logits_lib.logits(x.astype(self.dtype), embed.embedding.astype(self.dtype).T)
    else:
      init = nn.initializers.zeros if self.flavour == "llama" else dense_init()
      logits = logits_lib.LogitsHead(
          self.vocab_size, self.dtype, name="head",
          kernel_init=nn.with_logical_partitioning(init, ("embed", "vocab")))(x)
    return logits if cache is None else (logits, new_cache)

  def decode_step_path(self) -> str:
    """What `decode_step` resolves to for this model's heads: "xla" or "pallas"."""
    return decode_attention_lib.resolve(self.decode_step, self.width // self.num_heads)

  def _check_rope(self) -> int:
    """Validates rope / grid; returns the number of leading non-image positions (rope "2d")."""
    if self.rope not in ROPES:
      raise ValueError(f"unknown rope {self.rope!r}: one of {ROPES}")
    if self.rope == "1d":
      return 0
    if self.flavour != "llama":
      raise ValueError(f"rope='2d' is a Llama option; the {self.flavour} flavour has learned "
                       f"positions")
    if self.grid is None:
      raise ValueError("rope='2d' needs the image token grid (h, w)")
    h, w = self.grid
    if h * w > self.seq_len:
      raise ValueError(f"a {h}x{w} grid does not fit seq_len {self.seq_len}")
    return self.seq_len - h * w

  def init_cache(self, batch_size: int, length: int | None = None, dtype=None,
                 context_length: int | None = None) -> list:
    """An empty KV cache: per layer (k, v) zeros of [batch_size, heads, length (seq_len), head_dim]
    in `dtype` (the computation dtype); with cross_attention (k, v, context k, context v), the
    context's of [batch_size, context_length, heads, head_dim]."""
    hd = self.width // self.num_heads
    shape = (batch_size, self.num_heads, length or self.seq_len, hd)
    dtype = dtype or self.dtype
    if not self.cross_attention:
      return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(self.depth)]
    if not context_length:
      raise ValueError("the cache of a cross-attention ARTransformer needs the context_length")
    context = (batch_size, context_length, self.num_heads, hd)
    return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros(context, dtype),
             jnp.zeros(context, dtype)) for _ in range(self.depth)]
