"""A real multi-process run: 2 JAX processes x 2 CPU devices on 127.0.0.1 (jax.distributed, gloo),
started by launch/local.sh, train with global batches built from per-process data and save one
checkpoint that a single process then restores."""

import os
import re
import subprocess
import sys

import jax
import numpy as np

from vqkd_jax.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_two_processes_train_and_checkpoint(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  proc = subprocess.run(
      ["bash", os.path.join(ROOT, "launch", "local.sh"), "2", sys.executable,
       os.path.join(ROOT, "tests", "scripts", "multiprocess_train.py"), str(tmp_path / "run")],
      env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  found = re.findall(r"PROCESS (\d) of 2 devices 4 checksum (\S+)", proc.stdout)
  assert sorted(p for p, _ in found) == ["0", "1"], proc.stdout
  sums = {float(s) for _, s in found}
  assert len(sums) == 1, "the processes disagree on the parameters"
  restored = loop.load_trained(str(tmp_path / "run"))
  assert restored["step"] == 3 and jax.device_count() == 1
  total = sum(np.asarray(l, np.float64).sum() for l in jax.tree.leaves(restored["params"]))
  np.testing.assert_allclose(total, sums.pop(), rtol=1e-12)
