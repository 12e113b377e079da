"""A trained tokenizer as frozen pure functions, whatever stage trained it.

Every tokenizer stage module (train/vqkd.py, train/cluster.py, train/vqgan.py) exposes
`frozen_tokenizer(trained, precision) -> FrozenTokenizer`, built from `loop.load_trained(workdir)`;
`load_frozen_tokenizer(workdir)` dispatches on the stage saved in that work directory. The pixel
decoder, the proposal networks and the sampling API only see this interface.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

import jax
import jax.numpy as jnp

# Stages whose work directories hold a tokenizer -> the module with `frozen_tokenizer`.
TOKENIZER_STAGES = {
    "vqkd": "vqkd_jax.train.vqkd",
    "cluster": "vqkd_jax.train.cluster",
    "vqgan": "vqkd_jax.train.vqgan",
}


@dataclasses.dataclass
class FrozenTokenizer:
  """Attributes:
    stage: the stage that trained it ("vqkd", "cluster", "vqgan").
    num_codes, code_dim: vocabulary size and the dimension of a code vector.
    variables: every array the functions read (teacher included, for Cluster).
    encode: (variables, uint8 images [B, H, W, 3]) -> int32 indices [B, h, w].
    lookup: (variables, indices [B, h, w]) -> code vectors [B, h, w, code_dim] (float32), what a
      pixel decoder reads.
    decode: (variables, indices) -> uint8 images, for tokenizers with their own pixel decoder
      (VQGAN, FSQ); None when a separate pixel decoder is needed (VQ-KD, Cluster).
    image_size: the training image size (the grid below is for it).
  """
  stage: str
  num_codes: int
  code_dim: int
  variables: Any
  encode: Callable[[Any, jax.Array], jax.Array]
  lookup: Callable[[Any, jax.Array], jax.Array]
  decode: Callable[[Any, jax.Array], jax.Array] | None = None
  image_size: int = 0

  def grid(self, image_size: int | None = None) -> tuple[int, int]:
    """(h, w) of the code grid of images of `image_size` (default: the training size)."""
    size = image_size or self.image_size
    shape = jax.eval_shape(self.encode, self.variables,
                           jax.ShapeDtypeStruct((1, size, size, 3), jnp.uint8)).shape
    return shape[1], shape[2]


def load_frozen_tokenizer(workdir: str, precision: str = "float32") -> FrozenTokenizer:
  """The tokenizer trained in `workdir` (any tokenizer stage), frozen."""
  from vqkd_jax.train.loop import load_trained

  trained = load_trained(workdir)
  stage = trained["config"].get("stage")
  if stage not in TOKENIZER_STAGES:
    raise ValueError(f"{workdir} holds a {stage!r} stage, not a tokenizer "
                     f"({', '.join(TOKENIZER_STAGES)})")
  return importlib.import_module(TOKENIZER_STAGES[stage]).frozen_tokenizer(trained, precision)
