"""Session-wide test setup: one persistent JAX compilation cache for the session's processes
(below); and when torch (the test reference, `make test` installs it) is there with torchvision,
torchvision imported once with its broken fake-op registrations skipped
(tests/torch_reference.py), so that transformers' PyTorch models and pytorch-fid import in any
test order."""

import importlib.util
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))

# One persistent JAX compilation cache for the session's processes (both xdist workers and the
# processes tests start, which inherit the variable): a program compiled in one of them (a tiny
# pipeline's stages, a stage resumed after a kill, a notebook's sampler) loads in the others.
# Set before JAX is imported; a cache dir given from outside is kept.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:   # the controller (first to import this file); the workers inherit its choice
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="vqkd-tests-jax-cache-")


def pytest_sessionfinish(session):
  if _OWN_CACHE and not hasattr(session.config, "workerinput"):   # not an xdist worker
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


if importlib.util.find_spec("torch") is not None:
  import torch

  from torch_reference import import_torchvision

  import_torchvision(torch)
