"""Where training metrics go: a JSONL log, TensorBoard event files and a console progress bar.

TensorBoard files are written directly (TFRecord framing with masked CRC32C around Event protocol
buffers, encoded by hand), so neither TensorFlow nor tensorboard is needed to write them.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import time
from typing import Mapping

import numpy as np


def _to_float(v) -> float:
  return float(np.asarray(v))


class JsonlWriter:
  """Appends one JSON object per write: {"step", "time", <metric>: float}."""

  def __init__(self, path: str):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    self._file = open(path, "a")

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    record = {"step": int(step), "time": time.time()}
    record.update({k: _to_float(v) for k, v in scalars.items()})
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()

  def close(self) -> None:
    self._file.close()


# ---------------------------------------------------------------------------- TensorBoard events

def _crc32c_table() -> list[int]:
  table = []
  for i in range(256):
    crc = i
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    table.append(crc)
  return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli), as TFRecord framing uses."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
  out = bytearray()
  while True:
    byte = n & 0x7F
    n >>= 7
    if n:
      out.append(byte | 0x80)
    else:
      out.append(byte)
      return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
  return _varint((number << 3) | wire_type) + payload


def _length_delimited(number: int, payload: bytes) -> bytes:
  return _field(number, 2, _varint(len(payload)) + payload)


def encode_event(wall_time: float, step: int, *, file_version: str | None = None,
                 scalars: Mapping[str, float] | None = None) -> bytes:
  """An Event proto: wall_time=1 (double), step=2 (int64), file_version=3 (string), summary=5
  (Summary{value=1: Value{tag=1, simple_value=2 (float)}})."""
  msg = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(int(step)))
  if file_version is not None:
    msg += _length_delimited(3, file_version.encode())
  if scalars:
    values = b"".join(
        _length_delimited(1, _length_delimited(1, tag.encode()) +
                          _field(2, 5, struct.pack("<f", _to_float(v))))
        for tag, v in scalars.items())
    msg += _length_delimited(5, values)
  return msg


def tfrecord(data: bytes) -> bytes:
  header = struct.pack("<Q", len(data))
  return (header + struct.pack("<I", _masked_crc(header)) + data +
          struct.pack("<I", _masked_crc(data)))


class TensorBoardWriter:
  """Scalar summaries in `logdir/events.out.tfevents.<time>.<host>`, readable by TensorBoard."""

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
    self.path = os.path.join(logdir, name)
    self._file = open(self.path, "ab")
    self._file.write(tfrecord(encode_event(time.time(), 0, file_version="brain.Event:2")))
    self._file.flush()

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    self._file.write(tfrecord(encode_event(time.time(), step, scalars=scalars)))
    self._file.flush()

  def close(self) -> None:
    self._file.close()


class MultiWriter:
  """Fans `write_scalars` out to several writers."""

  def __init__(self, writers):
    self.writers = list(writers)

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    for w in self.writers:
      w.write_scalars(step, scalars)

  def close(self) -> None:
    for w in self.writers:
      w.close()


class ProgressBar:
  """A one-line console progress display: step/total, rate, ETA and a few metrics."""

  def __init__(self, total: int, initial: int = 0, desc: str = "", disable: bool = False,
               keys=("loss",), stream=None):
    self.total, self.step, self.desc, self.disable, self.keys = total, initial, desc, disable, keys
    self.stream = stream or sys.stderr
    self._start, self._start_step, self._last_print = time.time(), initial, 0.0
    self._interactive = getattr(self.stream, "isatty", lambda: False)()

  def update(self, step: int, metrics: Mapping[str, float] | None = None) -> None:
    self.step = step
    now = time.time()
    # Redraw at most 4 times a second on a terminal, every 10 s in a log file, and at the end.
    interval = 0.25 if self._interactive else 10.0
    if self.disable or (now - self._last_print < interval and step < self.total):
      return
    self._last_print = now
    rate = (step - self._start_step) / max(now - self._start, 1e-9)
    eta = (self.total - step) / rate if rate > 0 else float("inf")
    shown = " ".join(f"{k}={_to_float(metrics[k]):.4g}" for k in self.keys
                     if metrics and k in metrics)
    width = 24
    filled = int(width * step / max(self.total, 1))
    line = (f"{self.desc} [{'#' * filled}{'.' * (width - filled)}] {step}/{self.total} "
            f"{rate:.1f} it/s eta {eta:.0f}s {shown}")
    end = "\r" if self._interactive and step < self.total else "\n"
    self.stream.write(line + end)
    self.stream.flush()

  def close(self) -> None:
    if not self.disable and self._interactive:
      self.stream.write("\n")
      self.stream.flush()
