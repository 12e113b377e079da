"""Device meshes from config, and logical-axis annotations turned into NamedShardings."""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vqkd_jax.parallel.strategies import BATCH_AXES, MESH_AXES, Strategy

log = logging.getLogger(__name__)


def resolve_mesh_shape(shape: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Fills the one `-1` entry of `shape` (axes data/fsdp/tensor) so that the product is num_devices."""
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"unknown mesh axes {sorted(unknown)}; axes are {MESH_AXES}")
  sizes = {a: int(shape.get(a, 1)) for a in MESH_AXES}
  fill = [a for a, s in sizes.items() if s == -1]
  if len(fill) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {fill}")
  known = math.prod(s for s in sizes.values() if s != -1)
  if fill:
    if num_devices % known:
      raise ValueError(f"mesh {dict(shape)} does not divide {num_devices} devices")
    sizes[fill[0]] = num_devices // known
  if math.prod(sizes.values()) != num_devices:
    raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} devices, have {num_devices}")
  return sizes


def make_mesh(shape: Mapping[str, int], devices=None) -> Mesh:
  """A mesh with axes ("data", "fsdp", "tensor") and automatic (not explicit) sharding."""
  devices = jax.devices() if devices is None else devices
  sizes = resolve_mesh_shape(shape, len(devices))
  axis_shape = tuple(sizes[a] for a in MESH_AXES)
  try:
    from jax.experimental import mesh_utils
    device_array = mesh_utils.create_device_mesh(axis_shape, devices=devices)
  except Exception:  # Simulated CPU devices or odd topologies: plain order.
    device_array = np.asarray(devices).reshape(axis_shape)
  return Mesh(device_array, MESH_AXES,
              axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(logical: P | None, shape: tuple[int, ...], mesh: Mesh,
                    rules: Mapping[str, Any]) -> P:
  """Maps a PartitionSpec of logical names to mesh axes.

  A dimension whose size the mesh axes do not divide, or whose mesh axis another dimension already
  uses, stays replicated (the returned spec says so; see `sharding_report`).
  """
  if logical is None:
    return P()
  used: set[str] = set()
  out = []
  for dim, name in zip(shape, tuple(logical) + (None,) * (len(shape) - len(logical))):
    axes = rules.get(name) if name is not None else None
    if axes is None:
      out.append(None)
      continue
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    axes = tuple(a for a in axes if mesh.shape[a] > 1 and a not in used)
    size = math.prod(mesh.shape[a] for a in axes)
    if not axes or dim % size:
      out.append(None)
      continue
    used.update(axes)
    out.append(axes[0] if len(axes) == 1 else axes)
  return P(*out)


def tree_shardings(boxed_abstract, mesh: Mesh, strategy: Strategy):
  """NamedShardings for a tree of abstract variables carrying flax logical-partitioning boxes."""
  rules = dict(strategy.rules)
  logical = nn.get_partition_spec(boxed_abstract)
  values = nn.unbox(boxed_abstract)
  return jax.tree.map(
      lambda spec, v: NamedSharding(mesh, logical_to_spec(spec, v.shape, mesh, rules)),
      logical, values, is_leaf=lambda x: isinstance(x, P) or x is None)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of a batch's leading axis over the data and fsdp mesh axes."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def sharding_report(shardings, abstract) -> dict[str, float]:
  """Fraction of parameter bytes that are sharded vs replicated (to spot silent replication)."""
  total = sharded = 0
  for s, v in zip(jax.tree.leaves(shardings), jax.tree.leaves(abstract)):
    n = math.prod(v.shape) * np.dtype(v.dtype).itemsize
    total += n
    if any(a is not None for a in s.spec):
      sharded += n
  return {"bytes": total, "sharded_fraction": sharded / max(total, 1)}
