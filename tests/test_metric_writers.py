"""Metric writers: TensorBoard event files read back by an independent reader (TFRecord framing with
a bit-by-bit CRC32C, Event protos parsed by google.protobuf from descriptors built here), JSONL
round trips, fan-out and the progress display."""

import io
import json
import math
import os
import struct
import time

import numpy as np
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, unknown_fields
from PIL import Image

from vqkd_jax.train import metric_writers as mw

# ----------------------------------------------------------------------- an independent reader


def crc32c_bitwise(data: bytes) -> int:
  """CRC-32C bit by bit (no table): reflected polynomial 0x82F63B78, init and final xor ~0."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc ^= byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
  return crc ^ 0xFFFFFFFF


def masked(crc: int) -> int:
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_tfrecords(path: str) -> list[bytes]:
  with open(path, "rb") as f:
    data = f.read()
  records, pos = [], 0
  while pos < len(data):
    assert len(data) - pos >= 16, "truncated record"
    header = data[pos:pos + 8]
    (length,) = struct.unpack("<Q", header)
    (header_crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
    assert header_crc == masked(crc32c_bitwise(header)), "bad length checksum"
    payload = data[pos + 12:pos + 12 + length]
    assert len(payload) == length, "truncated payload"
    (payload_crc,) = struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])
    assert payload_crc == masked(crc32c_bitwise(payload)), "bad data checksum"
    records.append(payload)
    pos += 16 + length
  return records


def _event_class():
  """Event / Summary / SessionLog message classes from descriptors written here (tensorflow's
  event.proto and summary.proto, the fields TensorBoard scalars and images use)."""
  F = descriptor_pb2.FieldDescriptorProto
  fdp = descriptor_pb2.FileDescriptorProto(name="vqkd_test_event.proto", package="vqkdtest",
                                           syntax="proto3")

  def field(msg, name, number, ftype, type_name=None, repeated=False, oneof=None):
    f = msg.field.add(name=name, number=number, type=ftype,
                      label=F.LABEL_REPEATED if repeated else F.LABEL_OPTIONAL)
    if type_name:
      f.type_name = type_name
    if oneof is not None:
      f.oneof_index = oneof

  summary = fdp.message_type.add(name="Summary")
  image = summary.nested_type.add(name="Image")
  field(image, "height", 1, F.TYPE_INT32)
  field(image, "width", 2, F.TYPE_INT32)
  field(image, "colorspace", 3, F.TYPE_INT32)
  field(image, "encoded_image_string", 4, F.TYPE_BYTES)
  value = summary.nested_type.add(name="Value")
  value.oneof_decl.add(name="value")
  field(value, "node_name", 7, F.TYPE_STRING)
  field(value, "tag", 1, F.TYPE_STRING)
  field(value, "simple_value", 2, F.TYPE_FLOAT, oneof=0)
  field(value, "image", 4, F.TYPE_MESSAGE, ".vqkdtest.Summary.Image", oneof=0)
  field(summary, "value", 1, F.TYPE_MESSAGE, ".vqkdtest.Summary.Value", repeated=True)
  session_log = fdp.message_type.add(name="SessionLog")
  status = session_log.enum_type.add(name="SessionStatus")
  for name, number in [("STATUS_UNSPECIFIED", 0), ("START", 1), ("STOP", 2), ("CHECKPOINT", 3)]:
    status.value.add(name=name, number=number)
  field(session_log, "status", 1, F.TYPE_ENUM, ".vqkdtest.SessionLog.SessionStatus")
  field(session_log, "checkpoint_path", 2, F.TYPE_STRING)
  event = fdp.message_type.add(name="Event")
  event.oneof_decl.add(name="what")
  field(event, "wall_time", 1, F.TYPE_DOUBLE)
  field(event, "step", 2, F.TYPE_INT64)
  field(event, "file_version", 3, F.TYPE_STRING, oneof=0)
  field(event, "graph_def", 4, F.TYPE_BYTES, oneof=0)
  field(event, "summary", 5, F.TYPE_MESSAGE, ".vqkdtest.Summary", oneof=0)
  field(event, "session_log", 7, F.TYPE_MESSAGE, ".vqkdtest.SessionLog", oneof=0)
  pool = descriptor_pool.DescriptorPool()
  pool.Add(fdp)
  return message_factory.GetMessageClass(pool.FindMessageTypeByName("vqkdtest.Event"))


Event = _event_class()


def _assert_no_unknown_fields(message):
  assert len(unknown_fields.UnknownFieldSet(message)) == 0, message
  for fd, value in message.ListFields():
    if fd.message_type is not None:
      for m in (value if fd.is_repeated else [value]):
        _assert_no_unknown_fields(m)


def read_events(path: str, strict: bool = True) -> list:
  """Event messages of a file. strict: every byte is a field the descriptors above know, and
  the encoding is canonical (protobuf re-serializes it to the same bytes)."""
  events = []
  for record in read_tfrecords(path):
    e = Event.FromString(record)
    if strict:
      _assert_no_unknown_fields(e)
      assert e.SerializeToString() == record
    events.append(e)
  return events


def _only_event_file(logdir) -> str:
  files = [f for f in os.listdir(logdir) if "tfevents" in f]
  assert len(files) == 1, files
  return os.path.join(logdir, files[0])


# --------------------------------------------------------------------------------------- tests

def test_crc32c_vectors():
  assert crc32c_bitwise(b"123456789") == 0xE3069283
  assert mw.crc32c(b"123456789") == 0xE3069283
  assert mw.crc32c(b"") == 0 and mw.crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 vector
  rng = np.random.default_rng(0)
  for n in [1, 7, 100, 4097]:
    data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    assert mw.crc32c(data) == crc32c_bitwise(data)
    assert mw.crc32c(data[n // 2:], mw.crc32c(data[:n // 2])) == crc32c_bitwise(data)
    assert mw.masked_crc32c(data) == masked(crc32c_bitwise(data))


def test_tensorboard_event_file(tmp_path):
  import jax.numpy as jnp

  t0 = time.time()
  with mw.TensorBoardWriter(str(tmp_path / "tb")) as w:
    w.write_scalars(1, {"loss": 0.5, "lr": np.float32(1e-4)})
    w.write_scalars(10, {"loss": jnp.asarray(0.25), "eval/psnr": np.float64(21.125),
                         "big": 1e40, "nan": float("nan"), "count": np.int64(3)})
    w.write_scalars(2**40, {"loss": -1.0})
    w.write_scalars(11, {})  # nothing to write
  path = _only_event_file(tmp_path / "tb")
  host_time = os.path.basename(path).split(".")
  assert host_time[:3] == ["events", "out", "tfevents"] and len(host_time[3]) == 10
  assert abs(int(host_time[3]) - t0) < 5

  events = read_events(path)
  assert [e.WhichOneof("what") for e in events] == ["file_version"] + ["summary"] * 3
  assert events[0].file_version == "brain.Event:2" and events[0].step == 0
  for e in events:
    assert t0 - 1 <= e.wall_time <= time.time() + 1
  assert [e.step for e in events[1:]] == [1, 10, 2**40]
  scalars = [{v.tag: v.simple_value for v in e.summary.value} for e in events[1:]]
  assert scalars[0] == {"loss": 0.5, "lr": pytest.approx(1e-4, rel=1e-7)}
  assert scalars[0]["lr"] == float(np.float32(1e-4))  # stored as float32
  s = scalars[1]
  assert (s["loss"], s["eval/psnr"], s["count"]) == (0.25, 21.125, 3.0)
  assert s["big"] == math.inf and math.isnan(s["nan"])
  assert list(s) == ["loss", "eval/psnr", "big", "nan", "count"]  # order kept
  assert scalars[2] == {"loss": -1.0}


def test_tensorboard_images_and_purge(tmp_path):
  grid = np.random.default_rng(1).integers(0, 256, (12, 20, 3), dtype=np.uint8)
  png = tmp_path / "grid.png"
  Image.fromarray(grid).save(png)
  bmp = tmp_path / "gray.bmp"
  Image.fromarray(grid[..., 0]).save(bmp)
  with mw.TensorBoardWriter(str(tmp_path / "tb"), purge_step=5) as w:
    w.write_images(7, "reconstructions", str(png))
    w.write_images(8, "gray", str(bmp))  # re-encoded as PNG
  events = read_events(_only_event_file(tmp_path / "tb"))
  assert events[1].WhichOneof("what") == "session_log"
  assert events[1].session_log.status == 1 and events[1].step == 5  # START: purge steps >= 5
  (v,) = events[2].summary.value
  assert (v.tag, events[2].step, v.WhichOneof("value")) == ("reconstructions", 7, "image")
  assert (v.image.height, v.image.width, v.image.colorspace) == (12, 20, 3)
  assert v.image.encoded_image_string == png.read_bytes()
  (v,) = events[3].summary.value
  assert (v.image.height, v.image.width, v.image.colorspace) == (12, 20, 1)
  with Image.open(io.BytesIO(v.image.encoded_image_string)) as im:
    assert im.format == "PNG"
    np.testing.assert_array_equal(np.asarray(im), grid[..., 0])


def test_reader_rejects_corruption(tmp_path):
  """The reader above really checks the framing (so the passing tests mean something)."""
  with mw.TensorBoardWriter(str(tmp_path)) as w:
    w.write_scalars(3, {"x": 1.0})
  path = _only_event_file(tmp_path)
  data = bytearray(open(path, "rb").read())
  data[-6] ^= 0x01
  open(path, "wb").write(bytes(data))
  with pytest.raises(AssertionError, match="checksum"):
    read_tfrecords(path)


def test_two_writers_never_share_a_file(tmp_path):
  a, b = mw.TensorBoardWriter(str(tmp_path)), mw.TensorBoardWriter(str(tmp_path))
  a.write_scalars(1, {"x": 1.0})
  b.write_scalars(1, {"x": 2.0})
  a.close(), b.close()
  assert a.path != b.path
  assert [len(read_events(p)) for p in (a.path, b.path)] == [2, 2]


def test_tensorboardx_cross_check(tmp_path):
  """Third-party confirmation when tensorboardX is installed: its Event proto parses our file, and
  our reader parses a file its writer made."""
  pytest.importorskip("tensorboardX")
  from tensorboardX import SummaryWriter
  from tensorboardX.proto import event_pb2

  with mw.TensorBoardWriter(str(tmp_path / "ours")) as w:
    w.write_scalars(4, {"a/b": 1.5})
  records = read_tfrecords(_only_event_file(tmp_path / "ours"))
  theirs = [event_pb2.Event.FromString(r) for r in records]
  assert theirs[0].file_version == "brain.Event:2"
  assert theirs[1].step == 4 and theirs[1].summary.value[0].tag == "a/b"
  assert theirs[1].summary.value[0].simple_value == 1.5

  sw = SummaryWriter(str(tmp_path / "tbx"))
  sw.add_scalar("a/b", 2.5, 9)
  sw.close()
  events = read_events(_only_event_file(tmp_path / "tbx"), strict=False)
  assert events[0].file_version.startswith("brain.Event:")
  scal = [(e.step, v.tag, v.simple_value) for e in events for v in e.summary.value]
  assert scal == [(9, "a/b", 2.5)]


def test_jsonl_round_trip(tmp_path):
  import jax.numpy as jnp

  path = tmp_path / "logs" / "metrics.jsonl"
  w = mw.JsonlWriter(str(path))
  t0 = time.time()
  w.write_scalars(np.int64(1), {"loss": np.float32(0.5), "acc": jnp.asarray(0.75),
                                "n": np.int32(7), "ok": np.bool_(True), "bad": float("nan")})
  lines = path.read_text().splitlines()  # flushed before close
  assert len(lines) == 1
  w.write_scalars(2, {"loss": 0.25})
  w.write_images(2, "samples", "grids/samples_2.png")
  with pytest.raises(ValueError, match="collides"):
    w.write_scalars(3, {"step": 1.0})
  with pytest.raises(ValueError, match="scalars"):
    w.write_scalars(3, {"v": np.ones(3)})
  w.close()
  w2 = mw.JsonlWriter(str(path))  # appends
  w2.write_scalars(3, {"loss": 0.125})
  w2.close()

  records = mw.read_jsonl(str(path))
  assert [json.loads(line) for line in path.read_text().splitlines()][1:] == records[1:]
  assert [r["step"] for r in records] == [1, 2, 2, 3]
  r = records[0]
  assert (r["loss"], r["acc"], r["n"], r["ok"]) == (0.5, 0.75, 7, True)
  assert type(r["step"]) is int and type(r["n"]) is int and math.isnan(r["bad"])
  assert t0 - 1 <= r["time"] <= time.time() + 1
  assert records[2]["images"] == {"samples": "grids/samples_2.png"}
  assert records[3]["loss"] == 0.125
  # A line cut off by a crash is skipped.
  with open(path, "a") as f:
    f.write('{"step": 4, "lo')
  assert len(mw.read_jsonl(str(path))) == 4


def test_multi_writer(tmp_path):
  class Collect:
    def __init__(self):
      self.calls, self.closed = [], False

    def write_scalars(self, step, scalars):
      self.calls.append((step, dict(scalars)))

    def close(self):
      self.closed = True

  c = Collect()
  with mw.MultiWriter([c, mw.JsonlWriter(str(tmp_path / "m.jsonl")),
                       mw.TensorBoardWriter(str(tmp_path / "tb"))]) as w:
    w.write_scalars(5, {"loss": 1.0})
    png = tmp_path / "x.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(png)
    w.write_images(5, "x", str(png))  # skipped by writers without write_images
    w.flush()
  assert c.calls == [(5, {"loss": 1.0})] and c.closed
  assert [r["step"] for r in mw.read_jsonl(str(tmp_path / "m.jsonl"))] == [5, 5]
  events = read_events(_only_event_file(tmp_path / "tb"))
  assert [e.WhichOneof("what") for e in events] == ["file_version", "summary", "summary"]
  mw.MultiWriter([]).write_scalars(1, {"loss": 1.0})  # non-main processes


class _Tty(io.StringIO):
  def isatty(self):
    return True


def test_progress_bar_log_file():
  out = io.StringIO()
  bar = mw.ProgressBar(total=10, initial=2, desc="vqkd", keys=("loss", "missing"), stream=out,
                       log_interval=3600)
  for step in range(3, 11):
    bar.update(step, {"loss": np.float32(0.123456), "other": 1.0})
  bar.close()
  lines = out.getvalue().splitlines()
  # A log file: the first update and the last one, as whole lines without carriage returns.
  assert len(lines) == 2 and "\r" not in out.getvalue()
  assert lines[0].startswith("vqkd [") and "3/10" in lines[0] and "loss=0.1235" in lines[0]
  assert "10/10" in lines[1] and "step/s" in lines[1] and "other" not in lines[1]


def test_progress_bar_terminal_fallback_and_tqdm():
  out = _Tty()
  bar = mw.ProgressBar(total=4, stream=out, use_tqdm=False)
  bar.update(1, {"loss": 2.0})
  bar.update(4, {"loss": 1.0})
  bar.close()
  text = out.getvalue()
  assert text.startswith("\r") and "4/4" in text and text.endswith("\n") and "loss=1" in text

  pytest.importorskip("tqdm")
  out = _Tty()
  bar = mw.ProgressBar(total=4, stream=out, use_tqdm=True, desc="ar")
  assert bar._bar is not None
  for s in range(1, 5):
    bar.update(s, {"loss": 0.5})
  bar.write("hello")
  bar.close()
  text = out.getvalue()
  assert "4/4" in text and "loss=0.5" in text and "hello" in text

  quiet = io.StringIO()
  bar = mw.ProgressBar(total=3, stream=quiet, disable=True)
  bar.update(3, {"loss": 1.0})
  bar.close()
  assert quiet.getvalue() == ""
