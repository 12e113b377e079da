"""Session-wide test setup: when torch (the optional reference) is installed with torchvision, import
torchvision once with its broken fake-op registrations skipped (tests/torch_reference.py), so that
transformers' PyTorch models and pytorch-fid import in any test order. No-op in CI (no torch)."""

import importlib.util
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

if importlib.util.find_spec("torch") is not None:
  import torch

  from torch_reference import import_torchvision

  import_torchvision(torch)
