"""nn/filtered_draw.py against the XLA filters (proposal/sampling.top_k_top_p_filter, itself
checked against transformers' semantics in test_ar.py) and jax.random.categorical."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqkd_jax.nn import filtered_draw
from vqkd_jax.proposal import sampling


def _logits(rng, v):
  """A row with runs of ties, -inf, -0.0 and 0.0, and values of both signs."""
  x = (rng.normal(size=v) * 3).astype(np.float32)
  x[: v // 4] = np.round(x[: v // 4])          # ties, at the k-th value and the nucleus edge
  x[v // 4: v // 4 + 5] = -np.inf
  x[-2:] = (-0.0, 0.0)
  return x


@pytest.mark.parametrize("top_k, top_p", [(40, 0.92), (0, 0.5), (7, 1.0), (1, 0.9),
                                          (100, 0.0), (64, 0.999), (0, 1.0)])
def test_kept_set_equals_the_xla_filters(top_k, top_p):
  """Row r of the batch repeats one row of logits with noise 1e6 at token r only: the kernel draws
  r exactly when r survives the filters, which gives its whole kept set."""
  rng = np.random.default_rng(top_k)
  v = 100                                       # padded to 128 with -inf inside
  for _ in range(3):
    x = _logits(rng, v)
    kept = np.asarray(jnp.isfinite(sampling.top_k_top_p_filter(jnp.asarray(x[None]), top_k,
                                                                top_p)))[0]
    drawn = np.asarray(filtered_draw.filtered_draw(jnp.asarray(np.tile(x, (v, 1))),
                                                   jnp.asarray(1e6 * np.eye(v, dtype=np.float32)),
                                                   top_k, top_p))
    np.testing.assert_array_equal(drawn == np.arange(v), kept & np.isfinite(x))
    assert 0 < kept.sum() < v


def test_the_same_tokens_as_categorical():
  """sampling.draw's two paths: the same Gumbel streams, the same tokens (V not a power of two)."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(np.stack([_logits(rng, 1000) for _ in range(24)]))
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(3), i))(jnp.arange(24))
  for top_k, top_p in ((600, 0.92), (0, 0.8), (30, 1.0)):
    xla = np.asarray(sampling.draw(x, keys, 1.3, top_k, top_p, "xla"))
    pallas = np.asarray(sampling.draw(x, keys, 1.3, top_k, top_p, "pallas"))
    np.testing.assert_array_equal(pallas, xla)
    assert len(np.unique(xla)) > 12


def test_bisection_midpoint_has_no_overflow():
  lo, hi = jnp.int32(-2 ** 31), jnp.int32(2 ** 31 - 1)
  assert int(filtered_draw._midpoint(lo, hi, upper=False)) == -1
  assert int(filtered_draw._midpoint(lo, hi, upper=True)) == 0
  assert int(filtered_draw._midpoint(jnp.int32(-7), jnp.int32(-4), upper=False)) == -6
  # keys in the float order, -0.0 equal to 0.0
  x = np.array([-np.inf, -3.5, -1e-30, -0.0, 0.0, 1e-30, 2.0, np.inf], np.float32)
  keys = np.asarray(filtered_draw._ordered_keys(jnp.asarray(x)))
  assert (np.diff(keys) > 0).sum() == 6 and keys[3] == keys[4]


def test_errors():
  x = jnp.zeros((2, 8))
  with pytest.raises(ValueError, match="one \\[B, V\\] shape"):
    filtered_draw.filtered_draw(x, jnp.zeros((2, 9)))
  with pytest.raises(ValueError, match="top_k"):
    filtered_draw.filtered_draw(x, x, top_k=9)
  with pytest.raises(ValueError, match="top_p"):
    filtered_draw.filtered_draw(x, x, top_p=1.5)


def test_auto_draw_is_the_kernel_on_gpus_only(monkeypatch):
  """draw="auto" (sample's default) resolves to the kernel where Pallas compiles it (a GPU
  backend of compute capability 8.0 or later) and to XLA's ops elsewhere; an unknown setting is
  named."""
  assert sampling.resolve_draw("auto") == "xla"      # this CPU backend

  class H100:
    compute_capability = "9.0"

  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(jax, "devices", lambda *args: [H100()])
  assert sampling.resolve_draw("auto") == "pallas"
  assert sampling.resolve_draw("xla") == "xla"
  with pytest.raises(ValueError, match="draw must be one of"):
    sampling.resolve_draw("triton")


def test_a_tie_at_the_nucleus_edge_is_kept_whole():
  """The documented difference from the sorted rule: with two equal top values of mass 0.48
  each and top_p = 0.3, the sorted rule keeps the first of them only (the second has 0.48 before
  it); the kernel keeps both (nothing strictly above their value) and nothing else."""
  x = np.array([5.0, 1.0, 5.0, 0.0, 0.5, -2.0, 1.5, 0.25], np.float32)
  kept_xla = np.asarray(jnp.isfinite(sampling.top_k_top_p_filter(jnp.asarray(x[None]), 0, 0.3)))
  assert kept_xla.sum() == 1 and kept_xla[0, [0, 2]].sum() == 1
  drawn = np.asarray(filtered_draw.filtered_draw(jnp.asarray(np.tile(x, (8, 1))),
                                                 jnp.asarray(1e6 * np.eye(8, dtype=np.float32)),
                                                 0, 0.3))
  np.testing.assert_array_equal(drawn == np.arange(8), x == 5.0)
