"""Session-wide test setup: when torch (the optional reference) is installed with torchvision, import
torchvision once with its broken fake-op registrations skipped (tests/torch_reference.py), so that
transformers' PyTorch models and pytorch-fid import in any test order. No-op in CI (no torch).

JAX's persistent compilation cache, one directory per test run shared by the xdist workers and the
subprocesses the tests start (an environment variable, read when JAX is imported): the stage tests,
the demo, the notebook and the multi-device scripts compile many of the same programs (the demo-size
stages at the same shapes), and a program compiled once is read back after that. Cached
executables are the ones XLA would compile again: no result depends on the cache."""

import importlib.util
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID") or str(os.getpid())
  os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(
      tempfile.gettempdir(), f"vqkd_jax_test_cache_{_run_id}")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

if importlib.util.find_spec("torch") is not None:
  import torch

  from torch_reference import import_torchvision

  import_torchvision(torch)


def pytest_sessionfinish(session):
  """The run's compilation cache removed by the controller (xdist workers have `workerinput`)."""
  if not hasattr(session.config, "workerinput") and "_run_id" in globals():
    import shutil

    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
