"""One decoding step of causal self-attention over a KV cache, as one Pallas (Triton) kernel.

`append_and_attend(q, k, v, k_cache, v_cache, position, rotary)` (or `append_and_attend_qkv` of
the stacked projections [B, 3, H, hd], read in place) turns q and k by the rotary embedding of
`position` (optional), writes this step's key and value at `position` of the cache (in place: the
caches are aliased to the outputs) and attends the query to the cached positions <= position.
Each (row, head) is one program that reads only the filled part of its cache, `position` keys and
values, in blocks (masked loads) of 16, 32 or 64 positions by the grid's size (`launch_config`),
with an online softmax in float32 kept per lane of the block (the lanes combined once, after the
loop); the XLA einsum path reads the whole cache (masked), every layer and step.

It computes what `proposal.ar.CausalSelfAttention` computes with XLA's ops (the rotary in float32
rounded to the computation dtype, the scaled query in that dtype, scores and softmax in float32),
in another summation order, and keeps the softmax weights in float32 where the einsum path rounds
them to the computation dtype before multiplying the values: equal within rounding
(tests/test_decode_attention.py against the einsum path and a float64 closed form).

On GPUs the kernel is compiled by Pallas' Triton backend; elsewhere it runs in Pallas' interpret
mode (slow: for tests). `resolve` gives the path of an `implementation` setting.

Measured on an H100 (5 Dec 2026), Llama medium (16 heads of 64), 256 image tokens, batch 64 with
CFG (128 rows), bf16, `decode_kernels="fused_cublas"`: 157.6 images/s against 141.6 with the
einsums in 4 cache segments (the same tokens for one seed, but with the zero-initialised head's
equal logits: no test of the kernel; tests/test_decode_attention.py is), first call 5.4 s
against 21.8 s. The
kernel then takes 28.6 us per layer and step on average (2.3 TB/s of the cache read), 44% of the
sampling time. Turning q / k in the kernel (instead of an XLA fusion before it) left that at
28.7 us and saved the fusion's 1.7 us per layer and step; with nn/rms_norm.py's kernel for the
RMSNorms, 168.4 images/s. Tried and slower: blocks of 32 (156.7 images/s), 128 (152.5) and 256
with 8 warps (135.8); 2 warps (154.7); all blocks unrolled (146.8); 2 or 4 heads per program
(152.1, 146.1; 121.4 with 8 warps); with the rotary inside, 1 or 3 pipeline stages (166.8,
167.6 against 167-168) and 2 warps with 3 stages (161.8); plain (unmasked) loads for the
completely filled blocks (6 Dec: the same time alone, 0.378 against 0.372 s per batch).

Per-lane softmax states and the launch by grid size (ninth 6 Dec session, H200, `vqkd bench
sample`'s sampler, each set in one process). The kernel with one softmax state per program
reduced its [block] scores and [block, hd] weighted values across warps at every block; with a
state per lane the loop reduces over the head dim only, and each program holds fewer registers
at small blocks. Seconds per batch of 64, CFG / none (2,048 / 1,024 programs):
- one state, blocks of 64, 4 warps (before): 0.336-0.342 / 0.259-0.262;
- lanes, 64 / 4: 0.353 / 0.267 (slower: more registers, fewer programs resident);
- lanes, 32 / 2: 0.339 / 0.253-0.254 (the launch below 1,536 programs);
- lanes, 16 / 2: 0.322-0.327 / 0.267-0.270 (the launch from 1,536 programs): 196-199 against
  187-190 images/s with CFG;
- lanes 16 / 1 warp 0.327 / 0.281, 32 / 1 0.386 / 0.345, 8 / 1 0.379 / 0.344, 16 / 2 with 3
  stages 0.327 / 0.270, lanes 32 / 4 0.339 / 0.257; one state, 16 / 2: 0.332 / 0.280.
Grids below 768 programs keep blocks of 64 and 4 warps (not re-measured).

XLA's partitioner has no rule for the kernel's custom call, so inside a jit whose batch is
sharded over several GPUs it would run replicated (correct, slower); `proposal/sampling.sample`
therefore runs its decoding loop per device (shard_map) when the labels' batch is split over
devices.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from vqkd_jax.nn import pallas_backend
from vqkd_jax.nn import rms_norm as rms_norm_lib

IMPLEMENTATIONS = ("auto", "xla", "pallas")
NUM_STAGES = 2      # Triton's software pipelining of the block loop
# (programs at least, cache positions per block at most, warps of a program): the launch for a
# grid of rows x heads programs, the first that applies (`launch_config`).
LAUNCH_CONFIGS = ((1536, 16, 2), (768, 32, 2), (0, 64, 4))


def resolve(implementation: str, head_dim: int) -> str:
  """"xla" or "pallas" for heads of `head_dim`: "auto" is the kernel on GPUs where it applies (a
  power-of-two head dim, as Triton's blocks need; compute capability 8.0 or later,
  `pallas_backend.kernels_supported`) and the einsums elsewhere."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"decode attention must be one of {IMPLEMENTATIONS}, got {implementation!r}")
  fits = pallas_backend.is_power_of_two(head_dim)
  if implementation == "auto":
    return "pallas" if pallas_backend.kernels_supported() and fits else "xla"
  if implementation == "pallas" and not fits and pallas_backend.on_gpu():
    raise ValueError(f"the Pallas decode attention needs a power-of-two head dim, got {head_dim}: "
                     f"use decode_step='xla'")
  return implementation


def launch_config(programs: int, length: int) -> tuple[int, int]:
  """(cache positions per block, warps per program) for a grid of `programs` (rows x heads) over
  caches of `length` positions: small blocks when the grid is large, so that every program is
  resident at once (one wave) rather than the grid running in two or three. The block is the
  largest power of two <= min(length, the config's maximum)."""
  max_block, warps = next((b, w) for least, b, w in LAUNCH_CONFIGS if programs >= least)
  return 1 << (min(length, max_block).bit_length() - 1), warps


def _kernel(pos_ref, *refs, block: int, length: int, scale: float, pairs: int,
            rms_epsilon: float | None, dtype):
  """One (row, head): q / k / v refs [hd]; caches [S, hd] (the inputs aliased to the outputs);
  with `pairs`, cos / sin refs [pairs, hd / (2 pairs)] first; with `rms_epsilon`, then the row's
  un-normalised input x [D].

  With x, q / k / v are first scaled by its rsqrt(mean(x^2) + epsilon) in float32 and rounded to
  `dtype`. A head vector is handled as n = 2 pairs pieces of hd / n (n = 1 without rotary): the
  rotary turns piece 2p with piece 2p + 1 by (cos[p], sin[p]) in float32, then rounds to `dtype`
  (as `proposal.ar.rotary` does), and the scores are sums over the pieces: no in-kernel
  concatenation or gather. Values are read whole."""
  if pairs:
    cos_ref, sin_ref, *refs = refs
  if rms_epsilon is not None:
    x_ref, *refs = refs
  q_ref, k_ref, v_ref, k_cache_in, v_cache_in, o_ref, k_cache, v_cache = refs
  pos = pos_ref[0]
  hd = q_ref.shape[-1]
  n = 2 * pairs if pairs else 1
  c = hd // n
  if rms_epsilon is None:
    load = lambda ref, cols: ref[cols].astype(dtype)
  else:
    inv = rms_norm_lib.inverse_rms(x_ref[...], rms_epsilon)
    load = lambda ref, cols: (ref[cols].astype(jnp.float32) * inv).astype(dtype)
  qs = [load(q_ref, pl.ds(i * c, c)) for i in range(n)]
  ks = [load(k_ref, pl.ds(i * c, c)) for i in range(n)]
  for p in range(pairs):
    cos, sin = cos_ref[p, :], sin_ref[p, :]
    for xs in (qs, ks):
      a, b = xs[2 * p].astype(jnp.float32), xs[2 * p + 1].astype(jnp.float32)
      xs[2 * p] = (a * cos - b * sin).astype(dtype)
      xs[2 * p + 1] = (b * cos + a * sin).astype(dtype)
  qs = [(x * jnp.asarray(scale, dtype)).astype(jnp.float32) for x in qs]
  v_new = load(v_ref, slice(None))
  for i in range(n):
    k_cache[pl.ds(pos, 1), pl.ds(i * c, c)] = ks[i][None].astype(k_cache.dtype)
  v_cache[pl.ds(pos, 1), :] = v_new[None].astype(v_cache.dtype)
  # Each of the block's `block` lanes keeps its own online-softmax state (running max, sum of
  # weights, weighted values) over the positions it sees, so the loop reduces over the head dim
  # only; the lanes and this step's own key / value (always attended) are combined once after it.
  # A block starting past length - block is moved back to end at `length`: positions it repeats
  # from the block before are masked by kpos >= j * block.
  m0 = sum(jnp.sum(k.astype(k_cache.dtype).astype(jnp.float32) * q) for k, q in zip(ks, qs))
  v0 = v_new.astype(v_cache.dtype).astype(jnp.float32)

  def body(j, carry):
    m, l, acc = carry                                   # [block], [block], [block, hd]
    lo = j * block
    start = jnp.minimum(lo, length - block)
    kpos = start + jnp.arange(block)
    live = (kpos >= lo) & (kpos < pos)
    # Masked loads: rows past the filled cache are not read from memory.
    load = lambda ref, cols: pl_triton.load(ref.at[pl.ds(start, block), cols], mask=live[:, None],
                                            other=0.0).astype(jnp.float32)   # [block, cols]
    s = sum(jnp.sum(load(k_cache_in, pl.ds(i * c, c)) * qs[i][None, :], axis=1) for i in range(n))
    s = jnp.where(live, s, -jnp.inf)
    values = load(v_cache_in, slice(None))
    m_new = jnp.maximum(m, s)        # lanes start at the own score m0: finite, no inf - inf
    p = jnp.exp(s - m_new)
    alpha = jnp.exp(m - m_new)
    return m_new, l * alpha + p, acc * alpha[:, None] + p[:, None] * values

  m, l, acc = jax.lax.fori_loop(
      0, (pos + block - 1) // block, body,
      (jnp.full((block,), m0, jnp.float32), jnp.zeros((block,), jnp.float32),
       jnp.zeros((block, hd), jnp.float32)))
  top = jnp.max(m)                   # >= m0
  weights, own = jnp.exp(m - top), jnp.exp(m0 - top)
  l = jnp.sum(weights * l) + own
  acc = jnp.sum(weights[:, None] * acc, axis=0) + own * v0
  o_ref[...] = (acc / l).astype(o_ref.dtype)


def append_and_attend(q: jax.Array, k: jax.Array, v: jax.Array, k_cache: jax.Array,
                      v_cache: jax.Array, position: jax.Array, rotary=None):
  """q, k, v [B, H, hd] of one step at `position` (int32 scalar), caches [B, H, S, hd].

  Returns (output [B, H, hd] in q's dtype, k_cache, v_cache) with k / v written at `position`;
  the output attends to cache positions < position and to k / v. Inside a jitted loop the caches
  are updated in place (aliased); position must be < S (not checked on device).

  rotary: None (q and k used as given), or (cos, sin) float32 [P, hd / (2 P)] of this step's
  position: q and k are turned in the kernel, piece 2p of hd / (2 P) with piece 2p + 1 by
  (cos[p], sin[p]). P = 1 is the half-split rotary of `proposal.ar.rotary`, P = 2 the 2-D one of
  `rotary_2d` (rows on the first half, columns on the second)."""
  if k.shape != q.shape or v.shape != q.shape:
    raise ValueError(f"q, k, v must have one shape, got {q.shape}, {k.shape}, {v.shape}")
  row = lambda i, j: (i, j, 0)
  return _append_and_attend((q, k, v), (row, row, row), q.shape, k_cache, v_cache, position,
                            rotary)


def append_and_attend_qkv(qkv: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                          position: jax.Array, rotary=None, rms=None, dtype=None):
  """`append_and_attend` of the stacked projections qkv [B, 3, H, hd] (q, k, v on axis 1), read
  in place by the kernel (no slices copied out first).

  rms: None, or (x [B, D], epsilon) when qkv is the projection of the un-normalised rows x by a
  kernel with an RMSNorm's scale folded in (`proposal.ar.fuse_for_decoding(fold_norms=True)`):
  q / k / v are then scaled by each row's rsqrt(mean(x^2) + epsilon) in the kernel, which is
  RMSNorm then the projection, reordered. qkv is best float32 (the GEMM's accumulator), rounded
  to `dtype` (default qkv's; the output's) after the scaling, where the unfolded step rounds its
  projection."""
  if qkv.ndim != 4 or qkv.shape[1] != 3:
    raise ValueError(f"qkv must be [B, 3, H, hd], got {qkv.shape}")
  maps = tuple((lambda i, j, t=t: (i, t, j, 0)) for t in range(3))
  b, _, h, hd = qkv.shape
  if rms is not None and (rms[0].ndim != 2 or rms[0].shape[0] != b):
    raise ValueError(f"the rms rows x must be [{b}, D], got {rms[0].shape}")
  return _append_and_attend((qkv,) * 3, maps, (b, h, hd), k_cache, v_cache, position, rotary,
                            rms, dtype)


def _append_and_attend(srcs, maps, qshape, k_cache, v_cache, position, rotary, rms=None,
                       dtype=None):
  b, h, hd = qshape
  dtype = jnp.dtype(dtype or srcs[0].dtype)
  length = k_cache.shape[2]
  if k_cache.shape != (b, h, length, hd) or v_cache.shape != k_cache.shape:
    raise ValueError(f"caches must be [{b}, {h}, S, {hd}], got {k_cache.shape}, {v_cache.shape}")
  pairs = 0
  extra, extra_specs = (), []
  if rotary is not None:
    cos, sin = rotary
    pairs = cos.shape[0]
    if cos.shape != (pairs, hd // (2 * pairs)) or sin.shape != cos.shape or hd % (2 * pairs):
      raise ValueError(f"rotary (cos, sin) must be [P, {hd} / (2 P)], got {cos.shape}, "
                       f"{sin.shape}")
    extra = (cos.astype(jnp.float32), sin.astype(jnp.float32))
    extra_specs = [pl.BlockSpec(cos.shape, lambda i, j: (0, 0))] * 2
  if rms is not None:
    extra = (*extra, rms[0])
    extra_specs = [*extra_specs, pl.BlockSpec((None, rms[0].shape[1]), lambda i, j: (i, 0))]
  block, num_warps = launch_config(b * h, length)
  vec = lambda m: pl.BlockSpec((None,) * (len(srcs[0].shape) - 1) + (hd,), m)
  row = pl.BlockSpec((None, None, hd), lambda i, j: (i, j, 0))
  cache = pl.BlockSpec((None, None, length, hd), lambda i, j: (i, j, 0, 0))
  n_in = 1 + len(extra) + 3
  return pl.pallas_call(
      functools.partial(_kernel, block=block, length=length, scale=hd ** -0.5, pairs=pairs,
                        rms_epsilon=None if rms is None else float(rms[1]), dtype=dtype),
      out_shape=(jax.ShapeDtypeStruct(qshape, dtype),
                 jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
                 jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype)),
      grid=(b, h),
      in_specs=[pl.BlockSpec((1,), lambda i, j: (0,)), *extra_specs,
                *(vec(m) for m in maps), cache, cache],
      out_specs=(row, cache, cache),
      input_output_aliases={n_in: 1, n_in + 1: 2},
      name="decode_attention", **pallas_backend.call_params(num_warps, NUM_STAGES))(
          jnp.reshape(jnp.asarray(position, jnp.int32), (1,)), *extra, *srcs, k_cache, v_cache)
