"""A safe reader of PyTorch `.pth` state dicts into NumPy arrays, without torch.

`torch.save` writes a pickle whose tensors refer to raw storages kept beside it. Unpickling such a
file with `pickle.load` (or `torch.load(weights_only=False)`) can run arbitrary code; this reader
uses a restricted `pickle.Unpickler` whose `find_class` resolves only the few globals that a state
dict needs, each mapped to a NumPy builder:

  collections.OrderedDict                         -> OrderedDict
  torch._utils._rebuild_tensor_v2 / _rebuild_tensor -> np.ndarray (a copy of the strided view)
  torch._utils._rebuild_parameter(_with_state)    -> the array it wraps
  torch.<Dtype>Storage, torch.UntypedStorage      -> storage dtype markers (not callable)
  _codecs.encode(text, "latin1")                  -> bytes (how pickle protocol 2 writes bytes)

Any other global (a class of a pickled module, `os.system`, `builtins.eval`...) raises
`UnsafePickleError` naming it, before anything is called.

Two container formats (both little-endian):
  * zip (torch >= 1.6 default): `<root>/data.pkl` with storages `<root>/data/<key>`; the
    persistent id of a storage is ("storage", storage_type, key, location, numel).
  * legacy (`_use_new_zipfile_serialization=False`, and files written before torch 1.6): pickles
    of the magic number, the protocol version, a sys-info dict, the object (persistent ids
    ("storage", storage_type, root_key, location, numel, view_metadata)), the list of storage
    keys; then for each key an int64 element count followed by the raw bytes.

Usage:
  state = read_state_dict("weights.pth")   # {"conv.weight": np.ndarray, ...}
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from typing import Any, Callable

import numpy as np

LEGACY_MAGIC_NUMBER = 0x1950a86a20f9469cfc6c
LEGACY_PROTOCOL_VERSION = 1001


class UnsafePickleError(pickle.UnpicklingError):
  """The pickle references a global outside the allowed set (it is never imported or called)."""


class TorchFileError(ValueError):
  """The file is not a readable PyTorch state dict (bad format, truncated, inconsistent)."""


# ----------------------------------------------------------------------------------- dtypes


def _bfloat16():
  import ml_dtypes  # installed with jax
  return np.dtype(ml_dtypes.bfloat16)


_STORAGE_DTYPES: dict[str, Callable[[], np.dtype]] = {
    "DoubleStorage": lambda: np.dtype("<f8"),
    "FloatStorage": lambda: np.dtype("<f4"),
    "HalfStorage": lambda: np.dtype("<f2"),
    "BFloat16Storage": _bfloat16,
    "LongStorage": lambda: np.dtype("<i8"),
    "IntStorage": lambda: np.dtype("<i4"),
    "ShortStorage": lambda: np.dtype("<i2"),
    "CharStorage": lambda: np.dtype("i1"),
    "ByteStorage": lambda: np.dtype("u1"),
    "BoolStorage": lambda: np.dtype("?"),
    "ComplexFloatStorage": lambda: np.dtype("<c8"),
    "ComplexDoubleStorage": lambda: np.dtype("<c16"),
    "UntypedStorage": lambda: np.dtype("u1"),
}


class StorageType:
  """Stands for a torch storage class in the pickle; carries the NumPy dtype. Not callable."""

  def __init__(self, name: str):
    self.name = name
    self.dtype = _STORAGE_DTYPES[name]()

  def __repr__(self) -> str:
    return f"StorageType({self.name})"


class Storage:
  """A flat NumPy array of one storage's elements (`data`), shared by the tensors that view it."""

  def __init__(self, data: np.ndarray, key: str):
    self.data, self.key = data, key

  def __repr__(self) -> str:
    return f"Storage(key={self.key!r}, dtype={self.data.dtype}, numel={self.data.size})"


# ---------------------------------------------------------------------------------- builders


def _int_tuple(x, what: str) -> tuple[int, ...]:
  if not isinstance(x, (tuple, list)) or not all(type(v) is int for v in x):
    raise TorchFileError(f"tensor {what} must be a tuple of ints, got {x!r}")
  return tuple(x)


class _TensorRef:
  """A tensor whose storage may not be filled yet (legacy files keep the storages after the
  pickle); `_resolve` turns it into an array once every storage is read."""

  def __init__(self, storage, storage_offset, size, stride):
    if not isinstance(storage, Storage):
      raise TorchFileError(f"tensor storage must come from the file's storages, got {storage!r}")
    if type(storage_offset) is not int or storage_offset < 0:
      raise TorchFileError(f"bad storage offset {storage_offset!r}")
    self.size, self.stride = _int_tuple(size, "size"), _int_tuple(stride, "stride")
    if (len(self.size) != len(self.stride) or any(n < 0 for n in self.size)
        or any(s < 0 for s in self.stride)):
      raise TorchFileError(f"bad tensor geometry: size {self.size}, stride {self.stride}")
    self.storage, self.offset = storage, storage_offset

  def array(self) -> np.ndarray:
    """A contiguous copy of the strided view, bounds-checked before NumPy touches memory."""
    data = self.storage.data
    if 0 in self.size:
      return np.zeros(self.size, data.dtype)
    last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
    if last >= data.size:
      raise TorchFileError(f"tensor (offset {self.offset}, size {self.size}, stride "
                           f"{self.stride}) reads past the end of storage {self.storage.key!r} "
                           f"({data.size} elements)")
    view = np.lib.stride_tricks.as_strided(data[self.offset:], shape=self.size,
                                           strides=tuple(s * data.itemsize for s in self.stride),
                                           writeable=False)
    return np.array(view, order="C")


def _rebuild_tensor(storage, storage_offset, size, stride, *unused) -> _TensorRef:
  """torch._utils._rebuild_tensor(_v2)(storage, offset, size, stride, ...)."""
  return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *state) -> _TensorRef:
  """torch._utils._rebuild_parameter(_with_state): a Parameter is its tensor here."""
  if not isinstance(data, _TensorRef):
    raise TorchFileError(f"parameter data must be a tensor, got {type(data).__name__}")
  return data


def _resolve(obj, memo=None):
  """Replaces every _TensorRef in nested dicts, lists and tuples by its array."""
  memo = {} if memo is None else memo
  if id(obj) in memo:
    return memo[id(obj)]
  if isinstance(obj, _TensorRef):
    out = obj.array()
  elif isinstance(obj, dict):
    memo[id(obj)] = obj
    for k in list(obj):
      obj[k] = _resolve(obj[k], memo)
    out = obj
  elif isinstance(obj, list):
    memo[id(obj)] = obj
    obj[:] = [_resolve(v, memo) for v in obj]
    out = obj
  elif isinstance(obj, tuple):
    out = tuple(_resolve(v, memo) for v in obj)
  else:
    out = obj
  memo[id(obj)] = out
  return out


def _codecs_encode(text, encoding="utf-8", errors="strict") -> bytes:
  """_codecs.encode as protocol-2 pickles use it for bytes: latin-1 text only."""
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
    raise UnsafePickleError(f"_codecs.encode is only allowed for latin1 text, got {encoding!r}")
  return text.encode("latin1")


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("_codecs", "encode"): _codecs_encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves only the globals of `_ALLOWED` and torch storage types; storages come from
  `load_storage(storage_type, key, numel, view_metadata)`."""

  def __init__(self, file, load_storage: Callable | None):
    super().__init__(file, encoding="latin1")
    self._load_storage = load_storage

  def find_class(self, module: str, name: str):
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    if module == "torch" and name in _STORAGE_DTYPES:
      return StorageType(name)
    raise UnsafePickleError(
        f"refusing to load global {module}.{name}: a PyTorch state dict needs only tensors, "
        f"storages and OrderedDict (the file may hold a whole pickled model, or be malicious)")

  def persistent_load(self, pid):
    if self._load_storage is None:
      raise UnsafePickleError(f"unexpected persistent id {pid!r} in a plain pickle")
    if not isinstance(pid, tuple) or not pid:
      raise TorchFileError(f"bad persistent id {pid!r}")
    typename = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
    if typename != "storage":
      raise UnsafePickleError(f"persistent id of type {typename!r} (only 'storage' is allowed; "
                              "'module' means a whole pickled model)")
    if len(pid) == 5:
      _, storage_type, key, _location, numel = pid
      view = None
    elif len(pid) == 6:
      _, storage_type, key, _location, numel, view = pid
    else:
      raise TorchFileError(f"bad storage persistent id {pid!r}")
    if not isinstance(storage_type, StorageType):
      raise TorchFileError(f"storage type must be a torch storage class, got {storage_type!r}")
    key = key.decode("ascii") if isinstance(key, bytes) else str(key)
    if type(numel) is not int or numel < 0:
      raise TorchFileError(f"bad storage size {numel!r} for storage {key!r}")
    return self._load_storage(storage_type, key, numel, view)


def _unpickle(data: bytes | io.BufferedIOBase, load_storage: Callable | None = None):
  f = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
  return _RestrictedUnpickler(f, load_storage).load()


# ------------------------------------------------------------------------------- containers


def _storage_array(raw: bytes, dtype: np.dtype, numel: int, key: str,
                   big_endian: bool) -> np.ndarray:
  nbytes = numel * dtype.itemsize
  if len(raw) < nbytes:
    raise TorchFileError(f"storage {key!r} has {len(raw)} bytes, needs {nbytes} "
                         f"({numel} x {dtype})")
  arr = np.frombuffer(raw, dtype=dtype, count=numel)
  if big_endian and dtype.itemsize > 1:
    if dtype.kind == "V" or dtype.name == "bfloat16":
      arr = np.frombuffer(arr.view(np.uint16).byteswap().tobytes(), dtype=dtype)
    else:
      arr = arr.byteswap()
  return arr


def _load_zip(path: str):
  with zipfile.ZipFile(path) as zf:
    names = zf.namelist()
    pkls = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pkls) != 1:
      raise TorchFileError(f"{path}: a torch zip archive has one <root>/data.pkl, found {pkls}")
    root = pkls[0][: -len("data.pkl")]
    big_endian = False
    if root + "byteorder" in names:
      order = zf.read(root + "byteorder").decode().strip()
      if order not in ("little", "big"):
        raise TorchFileError(f"{path}: unknown byteorder {order!r}")
      big_endian = order == "big"
    storages: dict[str, Storage] = {}

    def load_storage(storage_type, key, numel, view):
      if view is not None:
        raise TorchFileError(f"{path}: storage views are not used by the zip format")
      if key not in storages:
        name = f"{root}data/{key}"
        if name not in names:
          raise TorchFileError(f"{path}: missing storage record {name}")
        raw = zf.read(name)
        storages[key] = Storage(
            _storage_array(raw, storage_type.dtype, numel, key, big_endian), key)
      return storages[key]

    return _resolve(_unpickle(zf.read(pkls[0]), load_storage))


def _load_legacy(path: str):
  with open(path, "rb") as f:
    try:
      magic = _unpickle(f)
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
      if isinstance(e, UnsafePickleError):
        raise
      raise TorchFileError(f"{path}: neither a torch zip archive nor a legacy torch file ({e})")
    if magic != LEGACY_MAGIC_NUMBER:
      raise TorchFileError(f"{path}: not a torch file (first pickle is {str(magic)[:50]!r}, "
                           "expected the legacy magic number); tar-format files from torch "
                           "< 0.1.10 are not supported")
    protocol = _unpickle(f)
    if protocol != LEGACY_PROTOCOL_VERSION:
      raise TorchFileError(f"{path}: unsupported legacy protocol version {protocol!r}")
    sys_info = _unpickle(f)
    if not isinstance(sys_info, dict) or not sys_info.get("little_endian", True):
      raise TorchFileError(f"{path}: big-endian legacy files are not supported ({sys_info!r})")
    # Storages are created empty while the object is unpickled and filled afterwards, in the
    # order of the key list that follows the object.
    roots: dict[str, tuple[StorageType, int]] = {}
    # handle -> (storage, root key, offset, size)
    pending: dict[str, tuple[Storage, str, int, int]] = {}

    def load_storage(storage_type, key, numel, view):
      if key in roots and roots[key][0].dtype != storage_type.dtype:
        raise TorchFileError(f"{path}: storage {key!r} used with two dtypes")
      roots.setdefault(key, (storage_type, numel))
      if view is None:
        offset, size, handle = 0, numel, key
      else:
        view_key, offset, size = view
        handle = f"{key}/{view_key}"
        if type(offset) is not int or type(size) is not int or offset < 0 or size < 0:
          raise TorchFileError(f"{path}: bad storage view {view!r}")
      if handle not in pending:
        pending[handle] = (Storage(np.zeros(0, storage_type.dtype), handle), key, offset, size)
      return pending[handle][0]

    obj = _unpickle(f, load_storage)
    keys = _unpickle(f)
    if not isinstance(keys, list):
      raise TorchFileError(f"{path}: bad storage key list {keys!r}")
    data: dict[str, np.ndarray] = {}
    for key in keys:
      key = key.decode("ascii") if isinstance(key, bytes) else str(key)
      if key not in roots:
        raise TorchFileError(f"{path}: storage key {key!r} not referenced by the object")
      storage_type, numel = roots[key]
      header = f.read(8)
      if len(header) != 8:
        raise TorchFileError(f"{path}: truncated before storage {key!r}")
      (count,) = struct.unpack("<q", header)
      if count != numel:
        raise TorchFileError(f"{path}: storage {key!r} has {count} elements, expected {numel}")
      raw = f.read(count * storage_type.dtype.itemsize)
      data[key] = _storage_array(raw, storage_type.dtype, count, key, False)
    missing = set(roots) - set(data)
    if missing:
      raise TorchFileError(f"{path}: storages {sorted(missing)} have no data")
  for s, key, offset, size in pending.values():
    root = data[key]
    if offset + size > root.size:
      raise TorchFileError(f"{path}: storage view {s.key!r} past the end of {key!r}")
    s.data = root[offset:offset + size]
  return _resolve(obj)


def load(path: str | os.PathLike) -> Any:
  """Unpickles a torch-saved object (zip or legacy format) with tensors as NumPy arrays.

  Only containers (dict, OrderedDict, list, tuple), Python scalars/strings and tensors can be
  read; anything else raises UnsafePickleError naming the refused global.
  """
  path = os.fspath(path)
  if zipfile.is_zipfile(path):
    return _load_zip(path)
  return _load_legacy(path)


def read_state_dict(path: str | os.PathLike, key: str | None = None) -> dict[str, np.ndarray]:
  """A torch `.pth` state dict as {name: np.ndarray} (contiguous copies, torch dtypes mapped to
  NumPy; bfloat16 as ml_dtypes.bfloat16).

  Accepts a flat state dict, or one nested under "state_dict" (or under `key` when given: e.g.
  "model"). Raises TorchFileError when the result holds non-tensor entries (naming them).
  """
  obj = load(path)
  if not isinstance(obj, dict):
    raise TorchFileError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
  wrapper = key if key is not None else "state_dict"
  if key is not None or (wrapper in obj and isinstance(obj[wrapper], dict)):
    if wrapper not in obj:
      raise TorchFileError(f"{path}: no entry {wrapper!r} (top-level keys: {sorted(obj)[:20]})")
    obj = obj[wrapper]
    if not isinstance(obj, dict):
      raise TorchFileError(f"{path}: {wrapper!r} is a {type(obj).__name__}, not a dict")
  bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, np.ndarray)]
  if bad:
    raise TorchFileError(f"{path}: entries that are not tensors: {bad[:20]}"
                         + (f" (+{len(bad) - 20} more)" if len(bad) > 20 else ""))
  return dict(obj)
