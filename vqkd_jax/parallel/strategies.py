"""Parallelism strategies as tables: logical axis name -> mesh axes, plus a default mesh shape.

Every strategy computes the same function; only where parameters and activations live differs.
`pmap` is the classic data-parallel baseline (replicated parameters, `jax.pmap` with a named axis);
the others run under `jax.jit` with NamedSharding on a mesh with axes ("data", "fsdp", "tensor").
"""

from __future__ import annotations

import dataclasses

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # The batch is split over every axis that does not split features.


@dataclasses.dataclass(frozen=True)
class Strategy:
  """A named strategy: `rules` maps logical axis names to mesh axes (None = replicated)."""
  name: str
  rules: tuple[tuple[str, str | tuple[str, ...] | None], ...]
  default_mesh: dict
  uses_pmap: bool = False


_BATCH = (("batch", BATCH_AXES),)

STRATEGIES = {
    "pmap": Strategy("pmap", _BATCH, {"data": -1, "fsdp": 1, "tensor": 1}, uses_pmap=True),
    "dp": Strategy("dp", _BATCH, {"data": -1, "fsdp": 1, "tensor": 1}),
    # FSDP: every parameter (and its optimizer state) is split along its model-width axis.
    "fsdp": Strategy(
        "fsdp",
        _BATCH + (("embed", "fsdp"), ("conv_out", "fsdp"), ("code", None), ("codebook", "fsdp"),
                  ("vocab", None)),
        {"data": 1, "fsdp": -1, "tensor": 1}),
    # Tensor parallel (Megatron): heads and MLP hidden split; vocab split for the output head.
    "tp": Strategy(
        "tp",
        _BATCH + (("heads", "tensor"), ("mlp", "tensor"), ("vocab", "tensor"),
                  ("conv_out", "tensor")),
        {"data": 1, "fsdp": 1, "tensor": -1}),
    "fsdp_tp": Strategy(
        "fsdp_tp",
        _BATCH + (("embed", "fsdp"), ("heads", "tensor"), ("mlp", "tensor"), ("vocab", "tensor"),
                  ("conv_in", "fsdp"), ("conv_out", "tensor"), ("codebook", "fsdp")),
        {"data": 1, "fsdp": -1, "tensor": 2}),
}


def get_strategy(name: str) -> Strategy:
  if name not in STRATEGIES:
    raise ValueError(f"unknown parallel strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
  return STRATEGIES[name]
