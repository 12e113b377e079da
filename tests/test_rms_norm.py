"""nn/rms_norm: the Pallas RMSNorm (interpret mode off GPUs) against a float64 closed form and
flax.linen.RMSNorm, whose parameter tree it shares."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqkd_jax.nn import rms_norm


def test_against_closed_form_and_flax():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 1, 64)).astype(np.float32) * 4 + 1
  scale = (1 + 0.1 * rng.normal(size=(64,))).astype(np.float32)
  x64 = x.astype(np.float64)
  want = x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-5) * scale
  got = rms_norm.rms_norm(jnp.asarray(x), jnp.asarray(scale), 1e-5)
  assert got.shape == x.shape and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-6, atol=1e-6)
  # As a module: flax's parameter tree, flax's values (bfloat16 out as flax with dtype=bf16).
  for dtype in (jnp.float32, jnp.bfloat16):
    ours, theirs = rms_norm.RMSNorm(1e-5, dtype), nn.RMSNorm(epsilon=1e-5, dtype=dtype)
    params = theirs.init(jax.random.PRNGKey(0), x)
    assert jax.tree.map(jnp.shape, ours.init(jax.random.PRNGKey(0), x)) == \
        jax.tree.map(jnp.shape, params)
    params = {"params": {"scale": jnp.asarray(scale)}}
    a, b = ours.apply(params, jnp.asarray(x, dtype)), theirs.apply(params, jnp.asarray(x, dtype))
    assert a.dtype == b.dtype == dtype
    tol = 1e-6 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               rtol=tol, atol=tol)


def test_errors():
  assert rms_norm.fits(1024) and not rms_norm.fits(768)
  with pytest.raises(ValueError, match="scale must be"):
    rms_norm.rms_norm(jnp.zeros((2, 8)), jnp.ones((4,)), 1e-5)


@pytest.mark.parametrize("block", [512, 16])
def test_rms_scaled_swiglu_against_closed_form(block, monkeypatch):
  """gate_up of the un-normalised rows (float32), scaled by each row's rsqrt(mean(x^2) + eps),
  rounded to the dtype, then silu(gate) * up: in float64 from the definition; F = 44 is not a
  power of two: 2 programs per row of 32 columns (the last moved back, overlapping), or 3 of 16."""
  monkeypatch.setattr(rms_norm, "SWIGLU_BLOCK", block)
  rng = np.random.default_rng(3)
  gate_up = (rng.normal(size=(4, 2, 44)) * 5).astype(np.float32)
  x = (rng.normal(size=(4, 32)) * rng.uniform(0.3, 5, (4, 1))).astype(np.float32)
  r = 1 / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-5)
  gate, up = gate_up[:, 0] * r, gate_up[:, 1] * r
  want = gate / (1 + np.exp(-gate)) * up
  for dtype, tol in ((jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)):
    got = rms_norm.rms_scaled_swiglu(jnp.asarray(gate_up), jnp.asarray(x), 1e-5, dtype)
    assert got.shape == (4, 44) and got.dtype == dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=tol, atol=tol)
  with pytest.raises(ValueError, match="gate_up must be"):
    rms_norm.rms_scaled_swiglu(jnp.asarray(gate_up[:, :1]), jnp.asarray(x), 1e-5, jnp.float32)
