"""Readers of external weight files (no torch, no unpickling of arbitrary objects)."""

from vqkd_jax.io.torch_pth import (TorchFileError, UnsafePickleError, load as load_torch,
                                   read_state_dict)

__all__ = ["TorchFileError", "UnsafePickleError", "load_torch", "read_state_dict"]
