"""Where training metrics go: a JSONL log, TensorBoard event files and a console progress bar.

TensorBoard files are written directly, so neither TensorFlow nor tensorboard is needed: a file
`events.out.tfevents.<time>.<host>` is a sequence of TFRecords

    uint64 length | uint32 masked_crc32c(length) | data | uint32 masked_crc32c(data)   (little endian)

whose data are `Event` protocol buffers, encoded here by hand:

    Event   { double wall_time = 1; int64 step = 2;
              oneof { string file_version = 3; Summary summary = 5; SessionLog session_log = 7; } }
    Summary { repeated Value value = 1; }
    Value   { string tag = 1; float simple_value = 2; Image image = 4; }
    Image   { int32 height = 1; int32 width = 2; int32 colorspace = 3; bytes encoded_image_string = 4; }
    SessionLog { SessionStatus status = 1; }   (START = 1)

The first record is the file-version event "brain.Event:2".

All writers share the interface `write_scalars(step, {name: value})`, `write_images(step, name,
path)`, `flush()`, `close()`, and are context managers.
"""

from __future__ import annotations

import io
import json
import os
import socket
import struct
import sys
import time
from typing import Any, Iterable, Mapping

import numpy as np


def _to_float(v) -> float:
  """A Python float from a Python/numpy/jax scalar (or size-1 array)."""
  return float(np.asarray(v).reshape(()))


def _to_json_value(v) -> Any:
  """Python scalar for JSON: ints stay ints, bools bools, everything numeric else a float."""
  if isinstance(v, (str, bool, int, float)) or v is None:
    return v
  arr = np.asarray(v)
  if arr.size != 1:
    raise ValueError(f"metric values must be scalars, got an array of shape {arr.shape}")
  return arr.reshape(()).item()


# ------------------------------------------------------------------------------------------ JSONL

class _FileWriter:
  """Flush/close/context-manager behaviour shared by the writers that own one open file `_file`."""

  def flush(self) -> None:
    self._file.flush()

  def close(self) -> None:
    if not self._file.closed:
      self._file.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


class JsonlWriter(_FileWriter):
  """Appends one JSON object per write to `path` and flushes it.

  Scalars: {"step": int, "time": unix seconds, <metric>: number, ...} (flat, so that e.g.
  pandas.read_json(path, lines=True) gives one column per metric). Non-finite values are written
  as NaN / Infinity, which Python's json reads back. Images: {"step", "time", "images": {name: path}}.
  """

  def __init__(self, path: str):
    self.path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
    self._file = open(self.path, "a", encoding="utf-8")

  def _write(self, record: dict) -> None:
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    record = {"step": int(step), "time": time.time()}
    for k, v in scalars.items():
      if k in record:
        raise ValueError(f"metric name {k!r} collides with the record's own field")
      record[str(k)] = _to_json_value(v)
    self._write(record)

  def write_images(self, step: int, name: str, path: str) -> None:
    self._write({"step": int(step), "time": time.time(), "images": {name: os.fspath(path)}})



def read_jsonl(path: str) -> list[dict]:
  """All records of a JsonlWriter file (a truncated last line, e.g. after a crash, is skipped)."""
  records = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        if line.endswith("\n"):
          raise
  return records


# ---------------------------------------------------------------------------- CRC32C, TFRecord

def _crc32c_table() -> list[int]:
  table = []
  for i in range(256):
    crc = i
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1  # reflected Castagnoli polynomial
    table.append(crc)
  return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes, crc: int = 0) -> int:
  """CRC-32C (Castagnoli) of `data`, continuing from `crc`; crc32c(b"123456789") == 0xE3069283."""
  table = _CRC_TABLE
  crc ^= 0xFFFFFFFF
  for byte in bytes(data):
    crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  """The TFRecord checksum: CRC-32C rotated right by 15 bits plus 0xA282EAD8 (mod 2^32)."""
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
  """One TFRecord frame around `data`."""
  header = struct.pack("<Q", len(data))
  return (header + struct.pack("<I", masked_crc32c(header)) + data +
          struct.pack("<I", masked_crc32c(data)))


# ------------------------------------------------------------------------------ protobuf encoding

def _varint(n: int) -> bytes:
  n &= (1 << 64) - 1  # negative int64 / int32: two's complement, ten bytes
  out = bytearray()
  while True:
    byte = n & 0x7F
    n >>= 7
    if n:
      out.append(byte | 0x80)
    else:
      out.append(byte)
      return bytes(out)


def _key(number: int, wire_type: int) -> bytes:
  return _varint((number << 3) | wire_type)


def _varint_field(number: int, value: int) -> bytes:
  return _key(number, 0) + _varint(int(value))


def _bytes_field(number: int, payload: bytes) -> bytes:
  return _key(number, 2) + _varint(len(payload)) + payload


def _float32(value) -> bytes:
  with np.errstate(over="ignore"):  # beyond float32 range -> +-inf, as a float cast would
    return np.asarray(_to_float(value), np.float64).astype("<f4").tobytes()


def _scalar_value(tag: str, value) -> bytes:
  return _bytes_field(1, tag.encode("utf-8")) + _key(2, 5) + _float32(value)


def _image_value(tag: str, height: int, width: int, colorspace: int, encoded: bytes) -> bytes:
  image = (_varint_field(1, height) + _varint_field(2, width) + _varint_field(3, colorspace) +
           _bytes_field(4, encoded))
  return _bytes_field(1, tag.encode("utf-8")) + _bytes_field(4, image)


def encode_event(wall_time: float, step: int, *, file_version: str | None = None,
                 scalars: Mapping[str, Any] | None = None, summary_values: Iterable[bytes] = (),
                 session_start: bool = False) -> bytes:
  """An Event proto (wire format). Exactly one of file_version, scalars/summary_values (encoded
  Summary.Value messages) and session_start should be given (they are a oneof)."""
  msg = _key(1, 1) + struct.pack("<d", float(wall_time))
  if int(step):  # proto3 leaves default values out; readers take a missing step as 0
    msg += _varint_field(2, int(step))
  if file_version is not None:
    msg += _bytes_field(3, file_version.encode("utf-8"))
  values = [_scalar_value(tag, v) for tag, v in (scalars or {}).items()] + list(summary_values)
  if values:
    msg += _bytes_field(5, b"".join(_bytes_field(1, v) for v in values))
  if session_start:
    msg += _bytes_field(7, _varint_field(1, 1))  # SessionLog{status: START}
  return msg


# ---------------------------------------------------------------------------------- TensorBoard

class TensorBoardWriter(_FileWriter):
  """Scalar and image summaries in `logdir/events.out.tfevents.<time>.<host>`.

  purge_step: when resuming a run from a checkpoint at this step, a SessionLog START event at that
  step tells TensorBoard to drop events at steps >= purge_step left by the interrupted run.
  """

  def __init__(self, logdir: str, purge_step: int | None = None):
    self.logdir = os.fspath(logdir)
    os.makedirs(self.logdir, exist_ok=True)
    base = os.path.join(self.logdir,
                        f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}")
    self.path, n = base, 0
    while os.path.exists(self.path):  # two writers in one second: never interleave files
      n += 1
      self.path = f"{base}.{os.getpid()}.{n}"
    self._file = open(self.path, "xb")
    self._write(encode_event(time.time(), 0, file_version="brain.Event:2"))
    if purge_step is not None:
      self._write(encode_event(time.time(), purge_step, session_start=True))

  def _write(self, event: bytes) -> None:
    self._file.write(tfrecord(event))
    self._file.flush()

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """One event with a simple_value per tag (values cast to float32, as TensorBoard stores them)."""
    if scalars:
      self._write(encode_event(time.time(), step, scalars=scalars))

  def write_images(self, step: int, name: str, path: str) -> None:
    """Embeds the image file at `path` (PNG/JPEG/GIF as is; other formats re-encoded as PNG)."""
    from PIL import Image

    with open(path, "rb") as f:
      data = f.read()
    with Image.open(io.BytesIO(data)) as im:
      width, height = im.size
      colorspaces = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}
      colorspace = colorspaces.get(im.mode)
      if im.format not in ("PNG", "JPEG", "GIF") or colorspace is None:
        if colorspace is None:
          im = im.convert("RGBA" if "A" in im.getbands() or "transparency" in im.info else "RGB")
        colorspace = colorspaces[im.mode]
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        data = buf.getvalue()
    self._write(encode_event(time.time(), step,
                             summary_values=[_image_value(name, height, width, colorspace, data)]))



# ------------------------------------------------------------------------------------ fan out

class MultiWriter:
  """Fans write_scalars / write_images / flush / close out to several writers."""

  def __init__(self, writers: Iterable):
    self.writers = list(writers)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    for w in self.writers:
      w.write_scalars(step, scalars)

  def write_images(self, step: int, name: str, path: str) -> None:
    for w in self.writers:
      if hasattr(w, "write_images"):
        w.write_images(step, name, path)

  def flush(self) -> None:
    for w in self.writers:
      if hasattr(w, "flush"):
        w.flush()

  def close(self) -> None:
    for w in self.writers:
      w.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


# ------------------------------------------------------------------------------------ progress

class ProgressBar:
  """Console progress: step/total, rate (steps/s), ETA and the metrics named in `keys`.

  On a terminal it wraps tqdm when tqdm is importable; otherwise (or in a log file) it prints its
  own line: redrawn in place with a carriage return at most 4 times a second on a terminal, and as
  a new line every `log_interval` seconds (and at the end) when the stream is not a terminal.
  """

  def __init__(self, total: int, initial: int = 0, desc: str = "", disable: bool = False,
               keys: Iterable[str] = ("loss",), stream=None, use_tqdm: bool | None = None,
               log_interval: float = 10.0):
    self.total, self.step, self.desc, self.disable = int(total), int(initial), desc, disable
    self.keys = tuple(keys)
    self.stream = stream if stream is not None else sys.stderr
    self.log_interval = log_interval
    self._interactive = bool(getattr(self.stream, "isatty", lambda: False)())
    self._start, self._start_step, self._last_print = time.time(), self.step, float("-inf")
    self._bar, self._last_len = None, 0
    if use_tqdm is None:
      use_tqdm = self._interactive
    if use_tqdm and not disable:
      try:
        from tqdm import tqdm
      except ImportError:
        tqdm = None
      if tqdm is not None:
        self._bar = tqdm(total=self.total, initial=self.step, desc=desc, file=self.stream,
                         unit="step", dynamic_ncols=True, smoothing=0.1,
                         mininterval=0.25 if self._interactive else log_interval)

  def _shown(self, metrics) -> dict:
    if not metrics:
      return {}
    return {k: f"{_to_float(metrics[k]):.4g}" for k in self.keys if k in metrics}

  def update(self, step: int, metrics: Mapping[str, Any] | None = None) -> None:
    """Moves the bar to `step` (absolute) and shows the latest values of `keys` in `metrics`."""
    if self.disable:
      self.step = step
      return
    if self._bar is not None:
      shown = self._shown(metrics)
      if shown:
        self._bar.set_postfix(shown, refresh=False)
      self._bar.update(step - self.step)
      self.step = step
      return
    self.step = step
    now = time.time()
    interval = 0.25 if self._interactive else self.log_interval
    if now - self._last_print < interval and step < self.total:
      return
    self._last_print = now
    rate = (step - self._start_step) / max(now - self._start, 1e-9)
    eta = f"{(self.total - step) / rate:.0f}s" if rate > 0 else "?"
    shown = " ".join(f"{k}={v}" for k, v in self._shown(metrics).items())
    width = 24
    filled = int(width * min(step, self.total) / max(self.total, 1))
    line = (f"{self.desc} [{'#' * filled}{'.' * (width - filled)}] {step}/{self.total} "
            f"{rate:.2f} step/s eta {eta} {shown}").strip()
    if self._interactive:
      padded, self._last_len = line.ljust(self._last_len), len(line)
      self.stream.write("\r" + padded + ("\n" if step >= self.total else ""))
    else:
      self.stream.write(line + "\n")
    self.stream.flush()

  def write(self, message: str) -> None:
    """Prints a message without breaking the bar."""
    if self._bar is not None:
      self._bar.write(message, file=self.stream)
    else:
      self.stream.write(message + "\n")
      self.stream.flush()

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None
    elif not self.disable and self._interactive and self.step < self.total:
      self.stream.write("\n")
      self.stream.flush()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
