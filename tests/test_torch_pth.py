"""The torch-free .pth reader: files written by torch.save (zip and legacy formats) read back equal,
files assembled by hand from the documented formats read without torch, and pickles that reference
anything beyond tensors and containers are refused without running them."""

import pickle
import struct
import zipfile

import numpy as np
import pytest

from vqkd_jax.io import TorchFileError, UnsafePickleError, load_torch, read_state_dict


# ------------------------------------------------------------------- a tiny pickle assembler


class PickleWriter:
  """Protocol-2 pickle opcodes, written by hand (so that no torch is needed to make torch files)."""

  def __init__(self):
    self.b = bytearray(b"\x80\x02")

  def glob(self, module, name):
    self.b += b"c" + f"{module}\n{name}\n".encode()
    return self

  def str(self, s):
    e = s.encode()
    self.b += b"X" + struct.pack("<I", len(e)) + e
    return self

  def int(self, i):
    self.b += b"J" + struct.pack("<i", i)
    return self

  def op(self, code: bytes):
    self.b += code
    return self

  def ints(self, values):   # a tuple of ints
    self.op(b"(")
    for v in values:
      self.int(v)
    return self.op(b"t")

  def storage(self, key, numel, dtype="FloatStorage", view=None):
    self.op(b"(").str("storage").glob("torch", dtype).str(key).str("cpu").int(numel)
    if view is not None:
      self.op(b"(").str(view[0]).int(view[1]).int(view[2]).op(b"t")
    return self.op(b"t").op(b"Q")   # TUPLE, BINPERSID

  def tensor(self, key, numel, offset, size, stride, dtype="FloatStorage", view=None):
    self.glob("torch._utils", "_rebuild_tensor_v2").op(b"(")
    self.storage(key, numel, dtype, view).int(offset).ints(size).ints(stride).op(b"\x89")
    self.glob("collections", "OrderedDict").op(b")R")   # backward hooks: OrderedDict()
    return self.op(b"tR")

  def bytes(self) -> bytes:
    return bytes(self.b + b".")


def state_dict_pickle(entries) -> bytes:
  """entries: [(name, storage key, numel, offset, size, stride, dtype, view)] -> an OrderedDict."""
  w = PickleWriter().glob("collections", "OrderedDict").op(b")R").op(b"(")
  for name, key, numel, offset, size, stride, dtype, view in entries:
    w.str(name).tensor(key, numel, offset, size, stride, dtype, view)
  return w.op(b"u").bytes()


def plain_pickle(obj) -> bytes:
  return pickle.dumps(obj, protocol=2)


def write_legacy(path, obj_pickle: bytes, storages: dict[str, np.ndarray]):
  """The legacy layout: magic, protocol, sys info, object, key list, then per key int64 count +
  raw little-endian bytes."""
  with open(path, "wb") as f:
    f.write(plain_pickle(0x1950a86a20f9469cfc6c))
    f.write(plain_pickle(1001))
    f.write(plain_pickle({"protocol_version": 1001, "little_endian": True,
                          "type_sizes": {"short": 2, "int": 4, "long": 4}}))
    f.write(obj_pickle)
    f.write(plain_pickle(list(storages)))
    for arr in storages.values():
      f.write(struct.pack("<q", arr.size))
      f.write(arr.astype(arr.dtype.newbyteorder("<")).tobytes())


def write_zip(path, obj_pickle: bytes, storages: dict[str, np.ndarray], root="archive"):
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
    zf.writestr(f"{root}/data.pkl", obj_pickle)
    zf.writestr(f"{root}/byteorder", "little")
    for key, arr in storages.items():
      zf.writestr(f"{root}/data/{key}", arr.tobytes())
    zf.writestr(f"{root}/version", "3\n")


# ------------------------------------------------------------------------- without torch


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_hand_made_files_read_without_torch(tmp_path, fmt):
  base = np.arange(24, dtype=np.float32) * 0.5
  ints = np.array([3, -1, 7], np.int64)
  entries = [
      ("w", "0", 24, 0, (4, 6), (6, 1), "FloatStorage", None),
      ("w_t_slice", "0", 24, 1, (5, 4), (1, 6), "FloatStorage", None),   # w.T[1:], shared storage
      ("row", "0", 24, 12, (6,), (1,), "FloatStorage", None),
      ("every_other", "0", 24, 0, (12,), (2,), "FloatStorage", None),
      ("scalar", "1", 3, 2, (), (), "LongStorage", None),
      ("empty", "1", 3, 0, (0, 5), (5, 1), "LongStorage", None),
  ]
  path = tmp_path / f"m.{fmt}.pth"
  data = state_dict_pickle(entries)
  (write_zip if fmt == "zip" else write_legacy)(path, data, {"0": base, "1": ints})
  sd = read_state_dict(path)
  grid = base.reshape(4, 6)
  np.testing.assert_array_equal(sd["w"], grid)
  np.testing.assert_array_equal(sd["w_t_slice"], grid.T[1:])
  np.testing.assert_array_equal(sd["row"], grid[2])
  np.testing.assert_array_equal(sd["every_other"], base[::2])
  assert sd["scalar"].shape == () and sd["scalar"] == 7 and sd["scalar"].dtype == np.int64
  assert sd["empty"].shape == (0, 5)
  assert all(v.flags["C_CONTIGUOUS"] and v.flags["OWNDATA"] for v in sd.values())


def test_legacy_storage_views(tmp_path):
  """Pre-1.0 legacy files may give a tensor a view (view key, offset, size) of a root storage."""
  root = np.arange(10, dtype=np.float64)
  entries = [("a", "r", 10, 1, (2, 2), (2, 1), "DoubleStorage", ("v1", 3, 5)),   # root[3:8]
             ("b", "r", 10, 0, (10,), (1,), "DoubleStorage", None)]
  path = tmp_path / "views.pth"
  write_legacy(path, state_dict_pickle(entries), {"r": root})
  sd = read_state_dict(path)
  np.testing.assert_array_equal(sd["a"], root[3:8][1:5].reshape(2, 2))
  np.testing.assert_array_equal(sd["b"], root)


def test_out_of_bounds_view_is_refused(tmp_path):
  path = tmp_path / "oob.pth"
  write_zip(path, state_dict_pickle([("x", "0", 4, 2, (3,), (1,), "FloatStorage", None)]),
            {"0": np.zeros(4, np.float32)})
  with pytest.raises(TorchFileError, match="past the end"):
    read_state_dict(path)


def test_truncated_storage_is_refused(tmp_path):
  path = tmp_path / "short.pth"
  write_zip(path, state_dict_pickle([("x", "0", 8, 0, (8,), (1,), "FloatStorage", None)]),
            {"0": np.zeros(4, np.float32)})
  with pytest.raises(TorchFileError, match="bytes"):
    read_state_dict(path)


def _os_system_pickle(marker) -> bytes:
  """os.system("touch <marker>"), written as the opcodes a malicious file would contain."""
  return PickleWriter().glob("os", "system").op(b"(").str(f"touch {marker}").op(b"tR").bytes()


@pytest.mark.parametrize("fmt", ["zip", "legacy-object", "legacy-first"])
def test_malicious_pickle_is_refused_without_running(tmp_path, fmt):
  marker = tmp_path / "pwned"
  evil = _os_system_pickle(marker)
  path = tmp_path / "evil.pth"
  if fmt == "zip":
    write_zip(path, evil, {})
  elif fmt == "legacy-object":
    write_legacy(path, evil, {})
  else:
    path.write_bytes(evil)   # a plain pickle posing as a legacy file
  with pytest.raises(UnsafePickleError, match=r"os\.system"):
    load_torch(path)
  assert not marker.exists()


@pytest.mark.parametrize("module,name", [("builtins", "eval"), ("posix", "system"),
                                         ("torch.nn.modules.conv", "Conv2d"),
                                         ("subprocess", "Popen"), ("torch", "load")])
def test_other_globals_are_refused(tmp_path, module, name):
  path = tmp_path / "g.pth"
  write_zip(path, PickleWriter().glob(module, name).bytes(), {})
  with pytest.raises(UnsafePickleError, match=f"{module}.{name}"):
    load_torch(path)


def test_module_persistent_id_is_refused(tmp_path):
  """Whole-model legacy pickles use ("module", cls, ...) persistent ids."""
  w = PickleWriter().op(b"(").str("module").str("x").op(b"tQ")
  path = tmp_path / "m.pth"
  write_legacy(path, w.bytes(), {})
  with pytest.raises(UnsafePickleError, match="module"):
    load_torch(path)


def test_not_a_torch_file(tmp_path):
  path = tmp_path / "x.pth"
  path.write_bytes(b"hello world, not a pickle")
  with pytest.raises(TorchFileError):
    load_torch(path)
  path.write_bytes(plain_pickle({"a": 1}))
  with pytest.raises(TorchFileError, match="magic"):
    load_torch(path)


def test_non_tensor_entries_are_named(tmp_path):
  path = tmp_path / "mixed.pth"
  w = PickleWriter().op(b"}(").str("x").tensor("0", 2, 0, (2,), (1,)).str("epoch").int(3)
  write_zip(path, w.op(b"u").bytes(), {"0": np.ones(2, np.float32)})
  with pytest.raises(TorchFileError, match="epoch"):
    read_state_dict(path)
  assert load_torch(path)["epoch"] == 3


# ----------------------------------------------------------------------- against torch.save


@pytest.fixture(scope="module")
def torch():
  return pytest.importorskip("torch")


def _numpy(torch, t):
  t = t.detach()
  return t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()


@pytest.mark.parametrize("zipfmt", [True, False], ids=["zip", "legacy"])
def test_torch_save_roundtrip(torch, tmp_path, zipfmt):
  g = torch.Generator().manual_seed(0)
  base = torch.randn(6, 8, generator=g)
  model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                              torch.nn.Linear(5, 2))
  sd = model.state_dict()   # OrderedDict with _metadata, num_batches_tracked (0-d int64)
  sd.update({
      "f16": torch.randn(3, 5, generator=g).half(),
      "bf16": torch.randn(7, generator=g).bfloat16(),
      "i64": torch.randint(-2**40, 2**40, (4, 3), generator=g),
      "u8": torch.randint(0, 255, (5,), generator=g).to(torch.uint8),
      "bool": torch.rand(6, generator=g) > 0.5,
      "f64": torch.randn(2, 2, generator=g).double(),
      "transposed": base.t(),
      "strided": base[1::2, ::3],
      "shared_a": base[2],
      "shared_b": base[:, 5],
      "narrow_f16": torch.randn(10, 10, generator=g).half()[3:7, 2:9],
      "param": torch.nn.Parameter(torch.randn(3, generator=g)),
  })
  path = tmp_path / "sd.pth"
  torch.save(sd, path, _use_new_zipfile_serialization=zipfmt)
  got = read_state_dict(path)
  assert list(got) == list(sd)
  for k, v in sd.items():
    ref = _numpy(torch, v)
    assert got[k].shape == tuple(v.shape), k
    assert got[k].astype(ref.dtype).tobytes() == np.ascontiguousarray(ref).tobytes(), k
  assert got["f16"].dtype == np.float16 and got["i64"].dtype == np.int64
  assert got["bf16"].dtype.name == "bfloat16" and got["bool"].dtype == np.bool_

  # Nested under "state_dict", beside other entries.
  torch.save({"state_dict": sd, "epoch": 3, "meta": {"x": [1, 2]}}, path,
             _use_new_zipfile_serialization=zipfmt)
  nested = read_state_dict(path)
  assert set(nested) == set(sd)
  np.testing.assert_array_equal(nested["strided"], _numpy(torch, base[1::2, ::3]))


def test_torch_save_of_a_whole_module_is_refused(torch, tmp_path):
  path = tmp_path / "module.pth"
  torch.save(torch.nn.Linear(2, 3), path)
  with pytest.raises(UnsafePickleError, match="torch.nn.modules.linear.Linear"):
    load_torch(path)
