"""Config files: `path.py[:arg]` loading, `--config.a.b=value` overrides, one-line errors.

A config file defines `get_config(arg: str | None) -> ml_collections.ConfigDict`. `arg` is a variant
name or `k=v,k=v` (big_vision style); `parse_arg` turns it into a ConfigDict with typed defaults.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
from typing import Any, Iterable

import ml_collections


class ConfigError(ValueError):
  """A config problem, with a message fit for one line of output."""


def parse_arg(arg: str | None, *, lazy: bool = False, **defaults) -> ml_collections.ConfigDict:
  """Parses a config argument `"variant"` or `"k=v,k2=v2"` over typed `defaults`.

  A bare word `w` sets the boolean default `w` to True, else `variant=w` when `variant` is a
  default.
  Values are cast to the type of their default. Unknown keys raise ConfigError unless `lazy`.
  """
  out = ml_collections.ConfigDict(dict(defaults))
  if not arg:
    return out
  for item in arg.split(","):
    item = item.strip()
    if not item:
      continue
    if "=" in item:
      key, value = item.split("=", 1)
    elif isinstance(defaults.get(item), bool):
      key, value = item, "True"
    elif "variant" in defaults:
      key, value = "variant", item
    else:
      key, value = item, "True"
    key = key.strip()
    if key not in defaults:
      if lazy:
        out[key] = _literal(value)
        continue
      raise ConfigError(f"unknown config argument {key!r}; known: {', '.join(sorted(defaults))}")
    out[key] = _cast(value, defaults[key], key)
  return out


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads `path/to/config.py` or `path/to/config.py:arg` and returns its (unlocked) ConfigDict."""
  path, _, arg = spec.partition(":")
  if not path.endswith(".py"):
    raise ConfigError(f"config file must be a .py file, got {path!r}")
  if not os.path.isfile(path):
    raise ConfigError(f"config file not found: {path}")
  module_name = "vqkd_config_" + os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(module_name, path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except Exception as e:  # A broken config file: say which and why in one line.
    raise ConfigError(f"cannot load config {path}: {type(e).__name__}: {e}") from e
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path} defines no get_config(arg)")
  config = module.get_config(arg or None)
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"get_config in {path} must return a ConfigDict, got {type(config).__name__}")
  return config


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]) -> None:
  """Applies `a.b=value` overrides in place; the key must exist and the value must fit its type."""
  for override in overrides:
    if "=" not in override:
      raise ConfigError(f"config override must be key=value, got {override!r}")
    key, raw = override.split("=", 1)
    parent, leaf = _find_parent(config, key)
    current = parent[leaf]
    if isinstance(current, ml_collections.ConfigDict):
      raise ConfigError(f"config key {key!r} is a group; override its fields, e.g. {key}.<field>=...")
    value = _cast(raw, current, key)
    try:
      parent[leaf] = value
    except TypeError as e:
      raise ConfigError(f"config key {key!r}: {e}") from e


def load_config_with_overrides(spec: str, overrides: Iterable[str]) -> ml_collections.ConfigDict:
  """load_config + apply_overrides, then locks the config so that typos fail loudly."""
  config = load_config(spec)
  apply_overrides(config, overrides)
  config.lock()
  return config


def _find_parent(config: ml_collections.ConfigDict, dotted: str):
  parts = dotted.split(".")
  node = config
  for i, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      known = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      prefix = ".".join(parts[:i])
      close = difflib.get_close_matches(part, known, n=1)
      hint = f" (did you mean {'.'.join(filter(None, [prefix, close[0]]))!r}?)" if close else ""
      raise ConfigError(f"unknown config key {dotted!r}{hint}")
    if i == len(parts) - 1:
      return node, part
    node = node[part]
  raise AssertionError("unreachable")


def _literal(raw: str) -> Any:
  try:
    return ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    return raw


def _cast(raw: str, current: Any, key: str) -> Any:
  """Casts the string `raw` to the type of `current`, or raises ConfigError naming `key`."""
  if current is None:
    return _literal(raw)
  kind = type(current)
  try:
    if kind is bool:
      lowered = raw.strip().lower()
      if lowered in ("true", "1", "yes"):
        return True
      if lowered in ("false", "0", "no"):
        return False
      raise ValueError(raw)
    if kind is int:
      value = _literal(raw)
      if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
          return int(value)
        raise ValueError(raw)
      return value
    if kind is float:
      value = _literal(raw)
      if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(raw)
      return float(value)
    if kind is str:
      return raw
    if kind in (tuple, list):
      value = _literal(raw)
      if not isinstance(value, (tuple, list)):
        value = (value,)
      return kind(value)
  except ValueError:
    raise ConfigError(
        f"config key {key!r} expects {kind.__name__}, got {raw!r}") from None
  return _literal(raw)


def training_config(stage: str, **fields) -> ml_collections.ConfigDict:
  """The fields every stage's config has (see train/loop.py), with `fields` overriding them.

  Stage configs add their `model` group and stage-specific inputs on top of this.
  """
  from vqkd_jax.train.optimizers import optimizer_config

  config = ml_collections.ConfigDict()
  config.stage = stage
  config.seed = 0
  config.total_steps = 1000
  config.batch_size = 64
  config.precision = "float32"
  config.data = ml_collections.ConfigDict(dict(
      name="shapes", data_dir=os.path.expanduser("~/tensorflow_datasets"), image_size=32,
      augmentation="none", synthetic=False, num_classes=12, tokens_dir=""))
  config.optimizer = optimizer_config()
  config.parallel = ml_collections.ConfigDict(dict(
      strategy="dp", num_devices=0, init_on="auto",
      mesh=ml_collections.ConfigDict(dict(data=None, fsdp=None, tensor=None))))
  config.log_every = 50
  config.eval_every = 0
  config.checkpoint_every = 500
  config.keep_checkpoints = 2
  for key, value in fields.items():
    config[key] = value
  return config


def scale_steps(c: ml_collections.ConfigDict, steps: int) -> None:
  """Sets a stage's total_steps (and its eval / checkpoint / log cadence) to `steps`, scaling the
  warm-up and the GAN start by the same ratio."""
  ratio = steps / c.total_steps
  c.total_steps = steps
  c.eval_every = steps
  c.checkpoint_every = steps
  c.log_every = max(1, min(c.log_every, steps // 4))
  for group in ("optimizer", "disc_optimizer"):
    if group in c and "warmup_steps" in c[group]:
      c[group].warmup_steps = int(round(c[group].warmup_steps * ratio))
  if "gan" in c and c.gan is not None and "start" in c.gan:
    c.gan.start = int(round(c.gan.start * ratio))
