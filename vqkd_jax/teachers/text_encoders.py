"""Frozen text encoders for text-to-image: captions -> per-token hidden states and a padding mask.

config.text_encoder fields: kind, and
  "in_the_box": workdir, the work directory of a teacher_clip stage (configs/demo/teacher_clip.py):
    its caption tower (teachers/in_the_box_clip.TextTransformer) over the built-in captions'
    word vocabulary (teachers/in_the_box_captions.tokenize). Offline default.
  "hf_clip": path, a Hugging Face CLIP folder (CLIPModel / CLIPTextModel(WithProjection)):
    teachers/hf_clip_text.py, its tokenizer from the same folder.
Both give the states after the tower's final LayerNorm (CLIP's last_hidden_state) at every
position; the mask marks the caption's tokens (start and end tokens included), False on padding.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

TEXT_ENCODER_KINDS = ("in_the_box", "hf_clip")


@dataclasses.dataclass
class FrozenTextEncoder:
  """A frozen text tower.

  Attributes:
    kind: "in_the_box" or "hf_clip".
    variables: every array `encode` reads.
    encode: (variables, ids int32 [B, L], mask bool [B, L]) -> float32 [B, L, dim] hidden states.
      Jittable.
    tokenize: host-side, captions (list of str) -> (ids int32 [B, L], mask bool [B, L]) numpy
      (a CaptionTokenizer).
    dim: Dt, the width of the states.
    context_length: L.
  """
  kind: str
  variables: Any
  encode: Callable[[Any, jax.Array, jax.Array], jax.Array]
  tokenize: Callable[[Sequence[str]], tuple[np.ndarray, np.ndarray]]
  dim: int
  context_length: int


def load_text_encoder(cfg, precision: str = "float32") -> FrozenTextEncoder:
  """The text encoder named by `cfg.kind` (see the module docstring), weights loaded."""
  kind = cfg.kind
  if kind == "in_the_box":
    return in_the_box_text_encoder(cfg.workdir, precision)
  if kind == "hf_clip":
    from vqkd_jax.teachers.hf_clip_text import load_hf_clip_text_encoder
    return load_hf_clip_text_encoder(cfg.path, precision)
  raise ValueError(f"unknown text encoder kind {kind!r}; known: {', '.join(TEXT_ENCODER_KINDS)}")


class CaptionTokenizer:
  """Host-side tokenizer of a text encoder, without its weights (input pipelines): captions ->
  (ids int32 [B, L], mask bool [B, L]). Picklable (grain worker processes): the tokenizer is
  loaded on first use in each process.

  kind "in_the_box": the built-in captions' words (teachers/in_the_box_captions.tokenize, strict:
  unknown words raise); source unused. kind "hf_clip": transformers' CLIPTokenizer of the folder
  `source`."""

  def __init__(self, kind: str, source: str, context_length: int, vocab_size: int = 0):
    self.kind, self.source = kind, source
    self.context_length, self.vocab_size = context_length, vocab_size
    self._tokenizer = None

  def __getstate__(self):
    return dict(self.__dict__, _tokenizer=None)

  def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    texts = [texts] if isinstance(texts, str) else list(texts)
    if self.kind == "in_the_box":
      from vqkd_jax.teachers import in_the_box_captions as captions
      ids = captions.tokenize(texts, self.context_length)
      return ids, ids != captions.PAD_ID
    if self._tokenizer is None:
      from vqkd_jax.teachers.hf_clip_text import load_clip_tokenizer
      self._tokenizer = load_clip_tokenizer(self.source, self.vocab_size)
    out = self._tokenizer(texts, padding="max_length", max_length=self.context_length,
                          truncation=True, return_tensors="np")
    return np.asarray(out["input_ids"], np.int32), np.asarray(out["attention_mask"], bool)


def text_tokenizer(cfg) -> CaptionTokenizer:
  """The CaptionTokenizer of config.text_encoder, read from its configuration files only."""
  import json
  import os

  if cfg.kind == "in_the_box":
    with open(os.path.join(cfg.workdir, "config.json")) as f:
      return CaptionTokenizer("in_the_box", "", json.load(f)["model"]["context_length"])
  if cfg.kind == "hf_clip":
    from vqkd_jax.teachers import hf_checkpoint
    from vqkd_jax.teachers.hf_clip_text import text_config

    folder = hf_checkpoint.resolve_checkpoint(cfg.path)
    tc = text_config(hf_checkpoint.read_config(folder))
    return CaptionTokenizer("hf_clip", str(folder), tc["max_position_embeddings"],
                            tc["vocab_size"])
  raise ValueError(f"unknown text encoder kind {cfg.kind!r}; known: "
                   f"{', '.join(TEXT_ENCODER_KINDS)}")


def in_the_box_text_encoder(workdir: str, precision: str = "float32") -> FrozenTextEncoder:
  """The caption tower of the teacher_clip stage in `workdir`: states [B, L, text_width] after its
  final LayerNorm; mask = ids != PAD_ID (the words and <eos>)."""
  from vqkd_jax.teachers.in_the_box_clip import TextTransformer
  from vqkd_jax.train.teacher_clip import load_clip

  clip, variables = load_clip(workdir, precision)
  tower = TextTransformer(clip.vocab_size, clip.context_length, clip.text_width, clip.text_depth,
                          clip.text_heads, clip.mlp_ratio, dtype=clip.dtype)
  tower_vars = {"params": variables["params"]["text"]}

  def encode(variables, ids, mask):
    del mask  # Causal: the states of the words do not depend on the padding after them.
    return final_norm_states(tower, variables, ids)

  return FrozenTextEncoder(kind="in_the_box", variables=tower_vars, encode=encode,
                           tokenize=CaptionTokenizer("in_the_box", "", clip.context_length),
                           dim=clip.text_width,
                           context_length=clip.context_length)


def final_norm_states(tower, variables, ids: jax.Array) -> jax.Array:
  """Per-token outputs [B, L, width] (float32) of the in-the-box TextTransformer's final LayerNorm
  ("norm"), captured while the tower computes its pooled <eos> feature."""
  _, state = tower.apply(variables, ids, capture_intermediates=lambda m, _: m.name == "norm",
                         mutable=["intermediates"])
  return state["intermediates"]["norm"]["__call__"][0].astype(jnp.float32)
