"""Mesh shapes, logical-axis rules and per-function XLA options (the multi-device equivalence is in
test_training.py)."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from vqkd_jax.parallel import mesh as mesh_lib
from vqkd_jax.parallel.strategies import STRATEGIES, get_strategy
from vqkd_jax.parallel.xla_options import CUBLAS_GEMMS, NCHW_CONVS, jit_with_options


def test_resolve_mesh_shape():
  assert mesh_lib.resolve_mesh_shape({"data": -1}, 8) == {"data": 8, "fsdp": 1, "tensor": 1}
  assert mesh_lib.resolve_mesh_shape({"data": 2, "fsdp": -1, "tensor": 2}, 8) == {
      "data": 2, "fsdp": 2, "tensor": 2}
  with pytest.raises(ValueError, match="at most one"):
    mesh_lib.resolve_mesh_shape({"data": -1, "fsdp": -1}, 8)
  with pytest.raises(ValueError, match="does not divide"):
    mesh_lib.resolve_mesh_shape({"data": 3, "fsdp": -1}, 8)
  with pytest.raises(ValueError, match="unknown mesh axes"):
    mesh_lib.resolve_mesh_shape({"model": 2}, 8)


class _FakeMesh:
  def __init__(self, **shape):
    self.shape = shape


def test_logical_to_spec_follows_rules_and_divisibility():
  mesh = _FakeMesh(data=1, fsdp=4, tensor=2)
  fsdp_tp = dict(get_strategy("fsdp_tp").rules)
  assert mesh_lib.logical_to_spec(P("embed", "mlp"), (64, 256), mesh, fsdp_tp) == P("fsdp", "tensor")
  # 6 is not divisible by the 4-way fsdp axis: that dimension stays replicated.
  assert mesh_lib.logical_to_spec(P("embed", "mlp"), (6, 256), mesh, fsdp_tp) == P(None, "tensor")
  # Two dimensions never claim the same mesh axis.
  assert mesh_lib.logical_to_spec(P("embed", "embed"), (64, 64), mesh, fsdp_tp) == P("fsdp", None)
  assert mesh_lib.logical_to_spec(P("batch", None), (8, 3), mesh, fsdp_tp) == P("fsdp", None)
  dp = dict(get_strategy("dp").rules)
  assert mesh_lib.logical_to_spec(P("embed", "mlp"), (64, 256), mesh, dp) == P(None, None)


def test_every_strategy_is_a_table():
  assert set(STRATEGIES) == {"pmap", "dp", "fsdp", "tp", "fsdp_tp"}
  with pytest.raises(ValueError, match="unknown parallel strategy"):
    get_strategy("zero3")
  for s in STRATEGIES.values():
    assert dict(s.rules)["batch"] == ("data", "fsdp")


def test_jit_with_options_passes_options_at_top_level_only():
  scale = lambda x, n: x * n + 1.0
  x = np.arange(4, dtype=np.float32)
  # A misspelt option reaches XLA (which names it) when the function is called at top level.
  misspelt = jit_with_options(scale, {"xla_gpu_enable_trton_gemm": False}, static_argnames="n")
  with pytest.raises(Exception, match="xla_gpu_enable_trton_gemm"):
    misspelt(x, n=2)
  # Inside another trace JAX forbids the options; the call runs under the caller's instead:
  # traced arguments, and concrete ones with the trace entered through a closure.
  expected = x * 3 + 1.0
  np.testing.assert_array_equal(jax.jit(lambda y: misspelt(y, n=3))(x), expected)
  np.testing.assert_array_equal(jax.jit(lambda y: misspelt(x, n=3) + 0 * y)(x), expected)
  assert "mul" in str(jax.make_jaxpr(lambda y: misspelt(y, n=3))(x))
  # The project's options are known to XLA on this backend, and leave the function unchanged.
  for options in (CUBLAS_GEMMS, NCHW_CONVS):
    np.testing.assert_array_equal(jit_with_options(scale, options, static_argnames="n")(x, n=3),
                                  expected)
