"""nn/layer_norm: values and hand-written gradients against flax's nn.LayerNorm under autodiff (a
second code path) and a float64 closed form, over leading axes of any rank."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqkd_jax.nn import layer_norm as ln


def _data(shape, seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=shape) * 3 + 1, dtype)
  d = shape[-1]
  scale = jnp.asarray(rng.normal(size=d) * 0.5 + 1, jnp.float32)
  bias = jnp.asarray(rng.normal(size=d) * 0.1, jnp.float32)
  dy = jnp.asarray(rng.normal(size=shape), dtype)
  return x, scale, bias, dy


def _flax(x, scale, bias, eps, dtype):
  return nn.LayerNorm(epsilon=eps, dtype=dtype).apply({"params": {"scale": scale, "bias": bias}}, x)


def _closed_form(x, scale, bias, dy, eps):
  """float64 forward and the gradients by the chain rule written out per row."""
  x, dy, scale, bias = (np.asarray(a, np.float64) for a in (x, dy, scale, bias))
  mean = x.mean(-1, keepdims=True)
  r = 1.0 / np.sqrt(x.var(-1, keepdims=True) + eps)
  xhat = (x - mean) * r
  g = dy * scale
  dx = r * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))
  axes = tuple(range(x.ndim - 1))
  return xhat * scale + bias, dx, (dy * xhat).sum(axes), dy.sum(axes)


@pytest.mark.parametrize("shape", [(7, 32), (2, 5, 48), (2, 3, 4, 16)])
def test_against_flax_autodiff_and_the_float64_closed_form(shape):
  x, scale, bias, dy = _data(shape)
  eps = 1e-6
  ours, vjp = jax.vjp(lambda *a: ln.layer_norm(*a, eps), x, scale, bias)
  ref, ref_vjp = jax.vjp(lambda *a: _flax(*a, eps, jnp.float32), x, scale, bias)
  want = _closed_form(x, scale, bias, dy, eps)
  np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(ours), want[0], rtol=1e-5, atol=1e-5)
  for got, flax_grad, exact in zip(vjp(dy), ref_vjp(dy), want[1:]):
    assert got.shape == flax_grad.shape
    np.testing.assert_allclose(np.asarray(got), np.asarray(flax_grad), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got), exact, rtol=1e-4, atol=1e-5)


def test_bfloat16_inputs_with_float32_statistics_as_flax():
  """bf16 tokens and float32 parameters (the mixed-precision models): the output in the module's
  dtype, gradients in their primals' dtypes, equal to flax's to bf16 rounding."""
  x, scale, bias, dy = _data((4, 9, 64), seed=1, dtype=jnp.bfloat16)
  module = ln.LayerNorm(epsilon=1e-6, dtype=jnp.bfloat16)
  params = {"params": {"scale": scale, "bias": bias}}
  ours, vjp = jax.vjp(lambda x, p: module.apply(p, x), x, params)
  ref, ref_vjp = jax.vjp(lambda x, p: _flax(x, p["params"]["scale"], p["params"]["bias"], 1e-6,
                                            jnp.bfloat16), x, params)
  assert ours.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(ref, np.float32),
                             rtol=1e-2, atol=1e-2)
  (dx, dp), (rdx, rdp) = vjp(dy), ref_vjp(dy)
  assert dx.dtype == jnp.bfloat16 and dp["params"]["scale"].dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(dx, np.float32), np.asarray(rdx, np.float32),
                             rtol=2e-2, atol=2e-2)
  for k in ("scale", "bias"):
    np.testing.assert_allclose(np.asarray(dp["params"][k]), np.asarray(rdp["params"][k]),
                               rtol=1e-2, atol=1e-2)


def test_constant_rows_stay_finite():
  """A constant row has variance 0 (the one-pass variance clamped at 0): output = bias, finite
  gradients."""
  x = jnp.full((2, 8), 3.0)
  scale, bias = jnp.ones(8), jnp.arange(8.0)
  y, vjp = jax.vjp(lambda *a: ln.layer_norm(*a, 1e-6), x, scale, bias)
  np.testing.assert_allclose(np.asarray(y), np.broadcast_to(np.arange(8.0), (2, 8)), atol=1e-6)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in vjp(jnp.ones((2, 8))))
