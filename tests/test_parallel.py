"""Mesh shapes and logical-axis rules (the multi-device equivalence is in test_training.py)."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from vqkd_jax.parallel import mesh as mesh_lib
from vqkd_jax.parallel.strategies import STRATEGIES, get_strategy


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
