"""nn/activations.gelu: PyTorch's exact GELU x Phi(x), and its hand-written gradient, against the
float64 closed form (math.erf) and against jax.nn.gelu's autodiff (a second code path)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqkd_jax.nn import activations

# Both tails, zero, and values near the erf approximation's clamp.
X = np.concatenate([np.linspace(-9.0, 9.0, 721), [-1e-4, 1e-4, 0.0, -3.99, 4.01]]).astype(np.float32)


def _closed_form(x):
  cdf = np.array([0.5 * (1.0 + math.erf(v / math.sqrt(2.0))) for v in x.astype(np.float64)])
  pdf = np.exp(-0.5 * x.astype(np.float64) ** 2) / math.sqrt(2.0 * math.pi)
  return x * cdf, cdf + x * pdf


def test_values_and_gradient_against_the_float64_closed_form():
  """Within float32 rounding; in the left tail 1 + erf cancels (as in PyTorch's erf form), which
  leaves an absolute error below 1e-6 where the values are below 1e-5."""
  want, want_slope = _closed_form(X)
  got = activations.gelu(jnp.asarray(X))
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-6, atol=1e-6)
  slope = jax.vmap(jax.grad(activations.gelu))(jnp.asarray(X))
  np.testing.assert_allclose(np.asarray(slope), want_slope, rtol=2e-6, atol=1e-6)


def test_gradient_equals_autodiff_of_jax_gelu_through_a_network():
  """A cotangent that is not 1 reaches x scaled by the slope: the gradient of a small MLP matches
  the one autodiff takes through jax.nn.gelu(approximate=False)."""
  rng = np.random.default_rng(0)
  w1, w2 = (jnp.asarray(rng.normal(size=s), jnp.float32) / 4 for s in ((8, 32), (32, 3)))
  x = jnp.asarray(rng.normal(size=(5, 8)), jnp.float32)
  loss = lambda act: lambda w1, w2: jnp.sum(jnp.sin(act(x @ w1) @ w2))
  ours = jax.grad(loss(activations.gelu), argnums=(0, 1))(w1, w2)
  ref = jax.grad(loss(lambda h: jax.nn.gelu(h, approximate=False)), argnums=(0, 1))(w1, w2)
  for a, b in zip(ours, ref):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_in_and_out_with_float32_math(dtype):
  """Half-precision inputs give half-precision outputs and gradients: the float32 result rounded
  once (the closed form rounded to the dtype, within one unit of the last place)."""
  x = jnp.asarray(X[np.abs(X) < 6], dtype)
  want, want_slope = _closed_form(np.asarray(x, np.float32))
  y = activations.gelu(x)
  g = jax.vmap(jax.grad(lambda v: activations.gelu(v).astype(jnp.float32)))(x)
  assert y.dtype == dtype and g.dtype == dtype
  eps = float(jnp.finfo(dtype).eps)
  np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=eps, atol=eps * 1e-3)
  np.testing.assert_allclose(np.asarray(g, np.float64), want_slope, rtol=eps, atol=eps * 1e-3)


def test_backward_keeps_only_the_input():
  """The residuals that jax.vjp keeps for the backward pass are x alone; jax.nn.gelu's autodiff
  keeps three arrays of x's shape."""
  x = jnp.ones((4, 16), jnp.bfloat16)
  residuals = lambda f: [(a.shape, a.dtype) for a in jax.tree.leaves(jax.vjp(f, x)[1])]
  assert residuals(activations.gelu) == [((4, 16), jnp.bfloat16)]
  assert residuals(lambda v: jax.nn.gelu(v, approximate=False)).count(((4, 16), jnp.bfloat16)) == 3
