"""Nested parameter dicts as flat "a/b/kernel" maps, and the key/shape report of the weight
converters (what is missing, unexpected or wrongly shaped), shared by the Inception and LPIPS
ports."""

from __future__ import annotations

from typing import Any, Mapping


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
  """{"a": {"b": x}} -> {"a/b": x}."""
  out = {}
  for k, v in tree.items():
    name = f"{prefix}/{k}" if prefix else str(k)
    if isinstance(v, Mapping):
      out.update(flatten(v, name))
    else:
      out[name] = v
  return out


def unflatten(flat: Mapping[str, Any]) -> dict:
  """{"a/b": x} -> {"a": {"b": x}} (the inverse of flatten)."""
  tree: dict = {}
  for name, v in flat.items():
    node = tree
    *parents, leaf = name.split("/")
    for k in parents:
      node = node.setdefault(k, {})
    node[leaf] = v
  return tree


def shape_mismatches(got: Mapping[str, tuple], want: Mapping[str, tuple],
                     most: int = 12) -> list[str]:
  """["missing (n): a, b", "unexpected (n): ...", "wrong shape (n): k: got (expected want)"],
  the parts that apply, each listing at most `most` names."""
  missing = sorted(set(want) - set(got))
  unexpected = sorted(set(got) - set(want))
  wrong = sorted(f"{k}: {tuple(got[k])} (expected {tuple(want[k])})" for k in set(got) & set(want)
                 if tuple(got[k]) != tuple(want[k]))
  parts = []
  for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
    if items:
      parts.append(f"{title} ({len(items)}): " + ", ".join(items[:most])
                   + (" ..." if len(items) > most else ""))
  return parts
