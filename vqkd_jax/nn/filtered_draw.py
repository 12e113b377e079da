"""A top-k / top-p filtered categorical draw as one Pallas (Triton) kernel, for sampling steps.

`filtered_draw(logits, noise, top_k, top_p)` draws one index per row of logits [B, V] (float32)
from the Gumbel noise [B, V] (jax.random.gumbel of the row's key, as jax.random.categorical draws
it): the argmax of logits + noise over the tokens that survive transformers' top-k then top-p
filters (proposal/sampling.top_k_top_p_filter). With the same noise it draws the same token as
`jax.random.categorical(key, top_k_top_p_filter(logits))`, without sorting: one program per row
holds the row in registers and finds each filter's threshold by bisection over the float values'
ordering (as int32 keys, 32 halvings each):

- top-k: the k-th largest value t, the largest with count(x >= t) >= k (ties at t are kept, as
  `logits < kth` removes only smaller ones);
- top-p: among the kept values, with p = softmax over them, the smallest value v whose mass
  strictly above it, sum(p[x > v]), is < top_p. That is the sorted rule's threshold: token j of
  the descending order is kept when the tokens before it sum to < top_p. A run of equal values
  at that edge is kept whole, where the sorted rule keeps only its first members (in the sort's
  order of equal values) while their preceding mass stays < top_p: a network's float32 logits
  rarely tie.

Sums are in another order than the sorted cumulative sum of the XLA path (and Triton's exp is
not XLA's), so a token whose preceding mass lies within rounding of top_p can be kept by one path
and not the other; everything else is the same set and the same draw (tests/test_filtered_draw.py
against the XLA filters and jax.random.categorical, with ties and -inf).

Why: `lax.top_k` (k = 600 of V = 8,192, 64 rows) is a sort taking 33 us of an H100, and the
filters' other ops and the draw about 17 us more, at every sampling step (about 13 ms of a
384 ms batch of Llama medium with CFG). The kernel does 64 masked reductions per row instead.
Measured on an H100 (5 Dec 2026; Llama medium, batch 64 with CFG, 256 tokens): 22.7 us per step
(about 0.35 us per halving: the serial reductions, not memory, bound it), the sampler 365.7 against
372.3 ms per batch with XLA's draw (the same tokens, on the equal logits of a zero head; with the
head drawn at random, 6 Dec: the same tokens again, 363 against 372 ms);
`proposal/sampling.sample` draws with it on GPUs (draw="auto"). Tried on an H100 (6 Dec) and slower:
searches testing 4, 8, 16 or 32 keys a pass (one reduction over [ways, V]): 30 to 87 us alone, 374
to 392 against 372.9 ms per batch in the sampler. Tried on 6 Dec and not adopted: stopping each
search once its kept set is settled (a top-k count of exactly k; no key left inside the nucleus
interval). The same tokens; alone on rows of N(0, s^2) logits (s = 1, 3, 10) 26.7 to 28.3 against
23.2 us with the nucleus check as a second reduction; in the sampler (H200, the head drawn from N(0,
0.1^2)) 340.4 against 340.8 ms per batch with it packed into the mass's pass. It was 5.2 against
22.7 us per step only where every logit is equal (a zero-initialised Llama head: api.bench_sampling
now draws that head at random, so the benchmark times the searches a trained model needs).
On GPUs the kernel is compiled by Pallas' Triton backend (V padded to a power of two with
-inf); elsewhere it runs in Pallas' interpret mode.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from vqkd_jax.nn import pallas_backend

BISECTIONS = 32     # halvings of the int32 key range: exact for any float32 row


def num_warps(length: int) -> int:
  """Warps of a program for rows of `length` (a power of two): about 16 values per thread, so a
  row's values, keys and noise stay in registers."""
  return max(4, min(16, length // 512))


def _ordered_keys(x):
  """int32 keys in the order of float32 x (-0.0 and 0.0 equal): for a negative float its low 31
  bits are flipped, so larger magnitudes give smaller keys."""
  bits = jax.lax.bitcast_convert_type(x, jnp.int32)
  keys = jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)
  return jnp.where(x == 0, 0, keys)


def _midpoint(lo, hi, upper: bool):
  """floor((lo + hi) / 2) (or the ceiling), without int32 overflow."""
  floor = (lo & hi) + ((lo ^ hi) >> 1)
  return floor + ((lo ^ hi) & 1) if upper else floor


def _kernel(x_ref, noise_ref, o_ref, *, top_k: int, top_p: float):
  x = x_ref[...]                                                        # [V] float32
  keys = _ordered_keys(x)
  top = jnp.max(keys)
  threshold = jnp.min(keys)
  if top_k:
    # The largest t with count(keys >= t) >= top_k; it lies in [threshold, top].
    def kth(_, bounds):
      lo, hi = bounds
      mid = _midpoint(lo, hi, upper=True)
      enough = jnp.sum((keys >= mid).astype(jnp.int32)) >= top_k
      return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid - 1)
    threshold, _ = jax.lax.fori_loop(0, BISECTIONS, kth, (threshold, top))
  if top_p < 1.0:
    kept = keys >= threshold
    e = jnp.where(kept, jnp.exp(x - jnp.max(x)), 0.0)
    p = e / jnp.sum(e)
    # The smallest v in [threshold, top] with sum(p[keys > v]) < top_p (top satisfies it).
    def nucleus(_, bounds):
      lo, hi = bounds
      mid = _midpoint(lo, hi, upper=False)
      # (mid == hi once converged: top_p = 0 keeps only the largest value, with its ties)
      light = (jnp.sum(jnp.where(keys > mid, p, 0.0)) < top_p) | (mid >= hi)
      return jnp.where(light, lo, mid + 1), jnp.where(light, mid, hi)
    threshold, _ = jax.lax.fori_loop(0, BISECTIONS, nucleus, (threshold, top))
  scores = jnp.where(keys >= threshold, x + noise_ref[...], -jnp.inf)
  o_ref[...] = jnp.full((1,), jnp.argmax(scores).astype(jnp.int32))


def filtered_draw(logits: jax.Array, noise: jax.Array, top_k: int = 0,
                  top_p: float = 1.0) -> jax.Array:
  """int32 [B]: per row of logits [B, V], argmax(logits + noise) over the tokens kept by top-k
  (0: off) then top-p (1: off; 0 keeps only the largest value, with its ties, where the XLA
  filter keeps one of them). logits and noise are read as float32."""
  if logits.ndim != 2 or noise.shape != logits.shape:
    raise ValueError(f"logits and noise must be one [B, V] shape, got {logits.shape}, "
                     f"{noise.shape}")
  b, v = logits.shape
  if not 0 <= top_k <= v:
    raise ValueError(f"top_k must be in [0, {v}], got {top_k}")
  if not 0.0 <= top_p <= 1.0:
    raise ValueError(f"top_p must be in [0, 1], got {top_p}")
  length = 1 << (v - 1).bit_length()
  logits, noise = logits.astype(jnp.float32), noise.astype(jnp.float32)
  if length != v:     # padded tokens are -inf: never kept by top-k, never drawn
    logits = jnp.pad(logits, ((0, 0), (0, length - v)), constant_values=-jnp.inf)
    noise = jnp.pad(noise, ((0, 0), (0, length - v)))
  row = pl.BlockSpec((None, length), lambda i: (i, 0))
  return pl.pallas_call(
      functools.partial(_kernel, top_k=0 if top_k >= v else int(top_k), top_p=float(top_p)),
      out_shape=jax.ShapeDtypeStruct((b,), jnp.int32),
      grid=(b,),
      in_specs=[row, row],
      out_specs=pl.BlockSpec((1,), lambda i: (i,)),
      name="filtered_draw", **pallas_backend.call_params(num_warps(length), 1))(logits, noise)
