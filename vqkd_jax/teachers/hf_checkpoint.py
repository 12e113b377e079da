"""Hugging Face checkpoint folders read without PyTorch, and strict assignment to Flax parameters.

A folder holds config.json and weights as `model.safetensors` (or shards listed in
`model.safetensors.index.json`) or `flax_model.msgpack` (the transformers-Flax nested layout). Pickled
`pytorch_model.bin` files are never read. Weights come back as one flat dict in the PyTorch layout and
legacy hub names (`encoder.layer.0.attention.attention.query.weight` [out, in]), whatever the file: a
msgpack's Dense kernels [in, out] are transposed, conv kernels go from HWIO to OIHW, LayerNorm `scale`
and Embed `embedding` become `weight`.

`assign_params` maps those weights onto a Flax module's abstract parameters and raises one
`CheckpointMismatchError` that names every missing, unexpected and mis-shaped key.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import struct
from typing import Callable, Iterable

import numpy as np
from flax import traverse_util

CONFIG = "config.json"
PREPROCESSOR = "preprocessor_config.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
MSGPACK = "flax_model.msgpack"


class CheckpointMismatchError(ValueError):
  """The checkpoint's keys or shapes do not fit the module (the message lists all of them)."""


# ---------------------------------------------------------------------------------------------------
# Finding the folder


def resolve_checkpoint(path: str) -> pathlib.Path:
  """A local folder as is; otherwise `path` is taken as a hub id and fetched with
  huggingface_hub.snapshot_download (config, preprocessor config, safetensors, else msgpack).
  Raises FileNotFoundError with what to do when that is impossible (offline, no such id)."""
  local = pathlib.Path(os.path.expanduser(str(path)))
  if local.is_dir():
    return local
  if local.exists():
    raise NotADirectoryError(f"teacher path {str(path)!r} is a file; pass the checkpoint folder "
                             f"(config.json + {SAFETENSORS} or {MSGPACK})")
  if not _looks_like_hub_id(str(path)):
    raise FileNotFoundError(f"teacher checkpoint folder {str(path)!r} does not exist")
  return _fetch_from_hub(str(path))


def _looks_like_hub_id(path: str) -> bool:
  return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", path))


def _fetch_from_hub(repo_id: str) -> pathlib.Path:
  advice = (f"No local folder {repo_id!r}: it was taken as a Hugging Face hub id, which could not be "
            f"fetched. On a machine with network run `hf download {repo_id} config.json "
            f"preprocessor_config.json {SAFETENSORS}` (or {MSGPACK}) and pass the local folder as "
            f"the teacher path.")
  try:
    import huggingface_hub
  except ImportError as e:
    raise FileNotFoundError(advice + " (huggingface_hub is not installed)") from e
  base = [CONFIG, PREPROCESSOR]
  try:
    folder = None
    for weights in ([SAFETENSORS, SAFETENSORS_INDEX, "model-*.safetensors"], [MSGPACK]):
      folder = pathlib.Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=base + weights))
      if _weight_files(folder, must_exist=False):
        return folder
  except Exception as e:  # Offline mode, no network, no such repository, ...
    raise FileNotFoundError(f"{advice} ({type(e).__name__}: {e})") from e
  raise FileNotFoundError(f"hub repository {repo_id!r} has neither {SAFETENSORS} nor {MSGPACK} "
                          f"(pickled .bin files are not read)")


# ---------------------------------------------------------------------------------------------------
# Reading


def read_json(folder: pathlib.Path, name: str) -> dict | None:
  f = pathlib.Path(folder) / name
  return json.loads(f.read_text()) if f.exists() else None


def read_config(folder: pathlib.Path) -> dict:
  config = read_json(folder, CONFIG)
  if config is None:
    raise FileNotFoundError(f"{folder} has no {CONFIG}")
  return config


def _weight_files(folder: pathlib.Path, must_exist: bool = True) -> list[pathlib.Path]:
  folder = pathlib.Path(folder)
  index = read_json(folder, SAFETENSORS_INDEX)
  if index is not None:
    return [folder / f for f in sorted(set(index["weight_map"].values()))]
  for name in (SAFETENSORS, MSGPACK):
    if (folder / name).exists():
      return [folder / name]
  if must_exist:
    present = sorted(p.name for p in folder.iterdir())
    raise FileNotFoundError(f"{folder} has no {SAFETENSORS} or {MSGPACK} (pickled .bin files are "
                            f"not read); it holds {present}")
  return []


def read_weights(folder: pathlib.Path) -> dict[str, np.ndarray]:
  """All weights of the folder, flat, in the PyTorch layout with dotted legacy names."""
  weights = {}
  for f in _weight_files(folder):
    if f.suffix == ".msgpack":
      weights.update(flax_to_torch_layout(read_msgpack(f)))
    else:
      weights.update(read_safetensors(f))
  return weights


def read_safetensors(file: pathlib.Path) -> dict[str, np.ndarray]:
  """safetensors.numpy; bfloat16 tensors (which it cannot represent) are read from the raw file."""
  from safetensors.numpy import load_file
  try:
    return load_file(str(file))
  except TypeError:  # "data type 'bfloat16' not understood"
    return _read_safetensors_raw(file)


_RAW_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
               "I8": "i1", "U8": "u1", "BOOL": "?"}


def _read_safetensors_raw(file: pathlib.Path) -> dict[str, np.ndarray]:
  """The safetensors format: u64 header size, JSON header {name: dtype, shape, data_offsets}, data."""
  import ml_dtypes
  data = pathlib.Path(file).read_bytes()
  (n,) = struct.unpack("<Q", data[:8])
  header = json.loads(data[8:8 + n])
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    dtype = ml_dtypes.bfloat16 if info["dtype"] == "BF16" else np.dtype(_RAW_DTYPES[info["dtype"]])
    begin, end = info["data_offsets"]
    out[name] = np.frombuffer(data[8 + n + begin:8 + n + end], dtype).reshape(info["shape"])
  return out


def read_msgpack(file: pathlib.Path) -> dict:
  """The nested parameter dict of a transformers-Flax `flax_model.msgpack`."""
  from flax.serialization import msgpack_restore
  tree = msgpack_restore(pathlib.Path(file).read_bytes())
  if set(tree) == {"params"}:
    tree = tree["params"]
  return tree


def flax_to_torch_layout(tree: dict) -> dict[str, np.ndarray]:
  """Nested transformers-Flax params -> flat PyTorch-layout weights with dotted names."""
  out = {}
  for path, value in traverse_util.flatten_dict(tree).items():
    *parent, leaf = (str(p) for p in path)
    value = np.asarray(value)
    if leaf == "kernel":
      if value.ndim == 2:
        value = value.T
      elif value.ndim == 4:
        value = value.transpose(3, 2, 0, 1)  # [kh, kw, in, out] -> [out, in, kh, kw]
      else:
        raise ValueError(f"{'/'.join(map(str, path))}: kernel of unexpected rank {value.ndim}")
      leaf = "weight"
    elif leaf in ("scale", "embedding"):
      leaf = "weight"
    out[".".join(parent + [leaf])] = value
  return out


# ---------------------------------------------------------------------------------------------------
# Assignment


Transform = Callable[[np.ndarray], np.ndarray]


def assign_params(abstract_params, sources: dict[tuple[str, ...], tuple[str, Transform]],
                  weights: dict[str, np.ndarray], ignore: Iterable[str] = (), hint: str = "",
                  dtype=np.float32) -> dict:
  """Builds the parameter tree of `abstract_params` (shapes; boxed or plain) from checkpoint weights.

  sources: Flax parameter path -> (checkpoint key, transform of the checkpoint array into the Flax
    layout). ignore: regular expressions (re.match) of checkpoint keys that are known and unused
    (poolers, heads, text towers). Every abstract parameter needs its key with the right shape after
    the transform, and every checkpoint key must be used or ignored; otherwise one
    CheckpointMismatchError names all missing, unexpected and mis-shaped keys. Returns nested
    float32 NumPy arrays.
  """
  import flax.linen as nn
  flat = traverse_util.flatten_dict(nn.unbox(abstract_params))
  ignore = [re.compile(p) for p in ignore]
  params, missing, misshaped, undefined, used = {}, [], [], [], set()
  for path, leaf in flat.items():
    where = "/".join(path)
    if path not in sources:
      undefined.append(where)
      continue
    key, transform = sources[path]
    if key not in weights:
      missing.append(f"{key} (for {where} {tuple(leaf.shape)})")
      continue
    used.add(key)
    raw = weights[key]
    try:
      value = transform(raw)
    except (ValueError, IndexError):  # The array does not even have the rank expected.
      value = None
    if value is None or tuple(value.shape) != tuple(leaf.shape):
      got = "cannot be converted" if value is None else f"converts to {tuple(value.shape)}"
      misshaped.append(f"{key}: shape {tuple(raw.shape)} {got}, {where} needs {tuple(leaf.shape)}")
      continue
    params[path] = np.asarray(value, dtype)
  unexpected = sorted(k for k in weights
                      if k not in used and not any(p.match(k) for p in ignore))
  if missing or misshaped or unexpected or undefined:
    parts = []
    for title, items in (("missing", missing), ("unexpected", unexpected),
                         ("wrong shape", misshaped), ("without a source (a bug)", undefined)):
      if items:
        shown = "\n    ".join(items[:40])
        more = f"\n    ... and {len(items) - 40} more" if len(items) > 40 else ""
        parts.append(f"  {len(items)} {title}:\n    {shown}{more}")
    raise CheckpointMismatchError("checkpoint does not fit the module:\n" + "\n".join(parts)
                                  + (f"\n  {hint}" if hint else ""))
  return traverse_util.unflatten_dict(params)


def select_prefix(weights: dict, candidates: Iterable[str], probe: str) -> str:
  """The first prefix p of `candidates` with a key p + probe (e.g. "vision_model." or "")."""
  for p in candidates:
    if p + probe in weights:
      return p
  shown = ", ".join(sorted(weights)[:8])
  raise CheckpointMismatchError(
      f"checkpoint has no {probe!r} under any of the prefixes {list(candidates)}: not this model "
      f"family? First keys: {shown}")
