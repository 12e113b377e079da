"""One decoding step of causal self-attention over a KV cache, as one Pallas (Triton) kernel.

`append_and_attend(q, k, v, k_cache, v_cache, position)` writes this step's key and value at
`position` of the cache (in place: the caches are aliased to the outputs) and attends the query to
the cached positions <= position. Each (row, head) is one program that reads only the filled part
of its cache, `position` keys and values, in blocks of at most 64 (masked loads), with an online
softmax in float32; the XLA einsum path reads the whole cache (masked), every layer and step.

It computes what the einsums of `proposal.ar.CausalSelfAttention` compute (the scaled query in the
computation dtype, scores and softmax in float32), in another summation order, and keeps the
softmax weights in float32 where the einsum path rounds them to the computation dtype before
multiplying the values: equal within rounding (tests/test_decode_attention.py against the einsum
path and a float64 closed form).

On GPUs the kernel is compiled by Pallas' Triton backend; elsewhere it runs in Pallas' interpret
mode (slow: for tests). `resolve` gives the path of an `implementation` setting.

Measured on an H100 (5 Dec 2026), Llama medium (16 heads of 64), 256 image tokens, batch 64 with
CFG (128 rows), bf16, `decode_kernels="fused_cublas"`: 157.6 images/s against 141.6 with the
einsums in 4 cache segments (the same tokens for one seed), first call 5.4 s against 21.8 s. The
kernel then takes 28.6 us per layer and step on average (2.3 TB/s of the cache read), 44% of the
sampling time. Tried and slower there: blocks of 32 (156.7 images/s), 128 (152.5) and 256 with
8 warps (135.8); 2 warps (154.7); all blocks unrolled (146.8); 2 or 4 heads per program (152.1,
146.1; 121.4 with 8 warps). XLA's partitioner has no rule for the kernel's custom call, so with
the batch sharded over several GPUs it would run replicated (correct, slower; not measured).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

IMPLEMENTATIONS = ("auto", "xla", "pallas")
MAX_BLOCK = 64      # cache positions per block
NUM_WARPS = 4       # of a Triton program


def resolve(implementation: str, head_dim: int) -> str:
  """"xla" or "pallas" for heads of `head_dim`: "auto" is the kernel on GPUs where it applies (a
  power-of-two head dim, as Triton's blocks need) and the einsums elsewhere."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"decode attention must be one of {IMPLEMENTATIONS}, got {implementation!r}")
  fits = head_dim & (head_dim - 1) == 0
  if implementation == "auto":
    return "pallas" if jax.default_backend() == "gpu" and fits else "xla"
  if implementation == "pallas" and not fits and jax.default_backend() == "gpu":
    raise ValueError(f"the Pallas decode attention needs a power-of-two head dim, got {head_dim}: "
                     f"use decode_attention='xla'")
  return implementation


def _block(length: int) -> int:
  """The largest power of two <= min(length, MAX_BLOCK)."""
  return 1 << (min(length, MAX_BLOCK).bit_length() - 1)


def _kernel(pos_ref, q_ref, k_ref, v_ref, k_cache_in, v_cache_in, o_ref, k_cache, v_cache, *,
            block: int, length: int, scale: float):
  """One (row, head): q / k / v refs [hd]; caches [S, hd] (the inputs aliased to the outputs)."""
  pos = pos_ref[0]
  q = (q_ref[...] * jnp.asarray(scale, q_ref.dtype)).astype(jnp.float32)
  k_new, v_new = k_ref[...], v_ref[...]
  k_cache[pl.ds(pos, 1), :] = k_new[None].astype(k_cache.dtype)
  v_cache[pl.ds(pos, 1), :] = v_new[None].astype(v_cache.dtype)
  # The softmax state starts from this step's own key / value (always attended); the blocks
  # cover the positions < pos. A block starting past length - block is moved back to end at
  # `length`: positions it repeats from the block before are masked by kpos >= j * block.
  m0 = jnp.sum(k_new.astype(jnp.float32) * q)
  acc0 = v_new.astype(jnp.float32)

  def body(j, carry):
    m, l, acc = carry
    lo = j * block
    start = jnp.minimum(lo, length - block)
    kpos = start + jnp.arange(block)
    live = (kpos >= lo) & (kpos < pos)
    # Masked loads: rows past the filled cache are not read from memory.
    load = lambda ref: pl_triton.load(ref.at[pl.ds(start, block), :], mask=live[:, None],
                                      other=0.0).astype(jnp.float32)             # [block, hd]
    keys, values = load(k_cache_in), load(v_cache_in)
    s = jnp.where(live, jnp.sum(keys * q[None, :], axis=1), -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s))
    p = jnp.exp(s - m_new)
    alpha = jnp.exp(m - m_new)
    return m_new, l * alpha + jnp.sum(p), acc * alpha + jnp.sum(p[:, None] * values, axis=0)

  _, l, acc = jax.lax.fori_loop(0, (pos + block - 1) // block, body,
                                (m0, jnp.ones((), jnp.float32), acc0))
  o_ref[...] = (acc / l).astype(o_ref.dtype)


def append_and_attend(q: jax.Array, k: jax.Array, v: jax.Array, k_cache: jax.Array,
                      v_cache: jax.Array, position: jax.Array):
  """q, k, v [B, H, hd] of one step at `position` (int32 scalar), caches [B, H, S, hd].

  Returns (output [B, H, hd] in q's dtype, k_cache, v_cache) with k / v written at `position`;
  the output attends to cache positions < position and to k / v. Inside a jitted loop the caches
  are updated in place (aliased); position must be < S (not checked on device)."""
  b, h, hd = q.shape
  length = k_cache.shape[2]
  if k.shape != q.shape or v.shape != q.shape:
    raise ValueError(f"q, k, v must have one shape, got {q.shape}, {k.shape}, {v.shape}")
  if k_cache.shape != (b, h, length, hd) or v_cache.shape != k_cache.shape:
    raise ValueError(f"caches must be [{b}, {h}, S, {hd}], got {k_cache.shape}, {v_cache.shape}")
  block = _block(length)
  row = pl.BlockSpec((None, None, hd), lambda i, j: (i, j, 0))
  cache = pl.BlockSpec((None, None, length, hd), lambda i, j: (i, j, 0, 0))
  on_gpu = jax.default_backend() == "gpu"
  if on_gpu:
    params = dict(compiler_params=pl_triton.CompilerParams(num_warps=NUM_WARPS, num_stages=2))
  else:
    params = dict(interpret=True)
  return pl.pallas_call(
      functools.partial(_kernel, block=block, length=length, scale=hd ** -0.5),
      out_shape=(jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
                 jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype)),
      grid=(b, h),
      in_specs=[pl.BlockSpec((1,), lambda i, j: (0,)), row, row, row, cache, cache],
      out_specs=(row, cache, cache),
      input_output_aliases={4: 1, 5: 2},
      name="decode_attention", **params)(
          jnp.reshape(jnp.asarray(position, jnp.int32), (1,)), q, k, v, k_cache, v_cache)
