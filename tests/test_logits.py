"""nn/logits: float32 logits whose backward runs in the operands' dtype, against float64 matmuls
written out with NumPy, and LogitsHead against flax's nn.Einsum (a second code path)."""

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from vqkd_jax.nn import logits as logits_lib


def _data(shape, vocab, dtype, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=shape).astype(np.float32)
  k = (rng.normal(size=(shape[-1], vocab)) / np.sqrt(shape[-1])).astype(np.float32)
  g = rng.normal(size=shape[:-1] + (vocab,)).astype(np.float32)
  return jnp.asarray(x, dtype), jnp.asarray(k, dtype), jnp.asarray(g)


def _float64(x, k, g):
  """Forward and both gradients of sum(g * x @ k) in float64 (NumPy)."""
  x, k, g = (np.asarray(jnp.asarray(a, jnp.float32), np.float64) for a in (x, k, g))
  x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
  return x @ k, (g2 @ k.T).reshape(x.shape), x2.T @ g2


def _grads(x, k, g):
  y, vjp = jax.vjp(logits_lib.logits, x, k)
  return (y, *vjp(g))


def _rel(a, b):
  a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
  return np.max(np.abs(a - b)) / np.max(np.abs(b))


@pytest.mark.parametrize("shape", [(6, 32), (2, 5, 48)])
def test_float32_operands_are_float32_matmuls(shape):
  x, k, g = _data(shape, 40, jnp.float32)
  with jax.default_matmul_precision("float32"):   # not TF32 on GPUs
    y, dx, dk = _grads(x, k, g)
  assert y.dtype == dx.dtype == dk.dtype == jnp.float32
  for ours, ref in zip((y, dx, dk), _float64(x, k, g)):
    assert _rel(ours, ref) < 1e-6


def test_bfloat16_forward_in_float32_and_backward_in_bfloat16():
  x, k, g = _data((3, 7, 64), 96, jnp.bfloat16)
  y, dx, dk = _grads(x, k, g)
  # The forward is the float32-accumulated product of the bfloat16 operands.
  assert y.dtype == jnp.float32
  ref_y, ref_dx, ref_dk = _float64(x, k, g)
  assert _rel(y, ref_y) < 1e-6
  # The gradients come back in bfloat16, from the cotangent rounded to bfloat16: within a few
  # bfloat16 roundings (2^-8) of the float64 products of the unrounded cotangent.
  assert dx.dtype == dk.dtype == jnp.bfloat16
  for ours, ref in ((dx, ref_dx), (dk, ref_dk)):
    assert _rel(ours, ref) < 2e-2
  # JAX's own transpose (the float32 cotangent times the upcast operand) agrees to that rounding.
  _, vjp = jax.vjp(lambda a, b: jnp.einsum("btd,dv->btv", a, b,
                                           preferred_element_type=jnp.float32), x, k)
  auto_dx, auto_dk = vjp(g)
  assert _rel(dx, np.asarray(auto_dx.astype(jnp.float32), np.float64)) < 2e-2
  assert _rel(dk, np.asarray(auto_dk.astype(jnp.float32), np.float64)) < 2e-2


def test_mixed_operand_dtypes_are_rejected():
  x, k, _ = _data((2, 8), 4, jnp.bfloat16)
  with pytest.raises(ValueError, match="one dtype"):
    logits_lib.logits(x, k.astype(jnp.float32))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_logits_head_is_flax_einsum(dtype):
  x, _, _ = _data((2, 5, 24), 1, jnp.float32)
  init = nn.initializers.normal(0.3)
  ours = logits_lib.LogitsHead(40, dtype, kernel_init=init)
  ref = nn.Einsum((24, 40), "btd,dv->btv", use_bias=False, dtype=dtype,
                  preferred_element_type=jnp.float32, kernel_init=init)
  key = jax.random.PRNGKey(3)
  params, ref_params = ours.init(key, x), ref.init(key, x)
  # The same parameter name, shape and initial values: checkpoints load either way.
  assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, ref_params)
  np.testing.assert_array_equal(params["params"]["kernel"], ref_params["params"]["kernel"])
  y, y_ref = ours.apply(params, x), ref.apply(params, x)
  assert y.dtype == y_ref.dtype == jnp.float32
  np.testing.assert_array_equal(y, y_ref)


def _dots(jaxpr):
  """Every dot_general equation of a closed jaxpr, sub-jaxprs included."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      found.append(eqn)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      found.extend(_dots(sub))
  return found


def test_training_matmuls_take_bfloat16_operands_and_an_aligned_vocabulary():
  # What makes the head fast on GPUs: no float32 operand in the forward's or the backward's
  # matmuls (JAX's own transpose multiplies the float32 cotangent by an upcast operand), and a
  # vocabulary padded to VOCAB_MULTIPLE in each of them.
  x, k, _ = _data((2, 5, 64), 200, jnp.bfloat16)
  loss = lambda x, k: jnp.sum(logits_lib.logits(x, k) ** 2)
  dots = _dots(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, k).jaxpr)
  multiple = logits_lib.VOCAB_MULTIPLE
  assert multiple % 8 == 0            # 16-byte rows in bfloat16
  padded = -(-200 // multiple) * multiple
  assert len(dots) == 3
  for eqn in dots:
    assert [v.aval.dtype for v in eqn.invars] == [jnp.bfloat16] * 2
    assert any(padded in v.aval.shape for v in eqn.invars)
  auto = lambda x, k: jnp.sum(jnp.einsum("btd,dv->btv", x, k,
                                         preferred_element_type=jnp.float32) ** 2)
  auto_dots = _dots(jax.make_jaxpr(jax.grad(auto, argnums=(0, 1)))(x, k).jaxpr)
  assert any(v.aval.dtype == jnp.float32 for e in auto_dots for v in e.invars)
