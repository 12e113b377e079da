"""Captions of the built-in dataset as token ids: a tiny word vocabulary from the caption grammar.

The dataset's captions (data/shapes.py `caption_for`) are
"a [small|large] <colour> <shape> <place>", the place one of nine phrases ("at the top left",
"in the centre", ...). The vocabulary is built from that grammar, deterministically (no download):
ids 0 <pad>, 1 <eos>, 2 <unk>, then the words in the order they first appear in ("a", "small",
"large", colours, shapes, place phrases).
Two ways to ids [B, CONTEXT_LENGTH] (words, <eos>, then <pad>):
  tokenize(captions): host-side, from strings (any caption of the grammar; a later text-to-image
    stage prompts with it).
  caption_ids_from_annotation(labels, segmentation): jittable, from an image's label and
    segmentation map: the caption the dataset's law gives the object that the map shows (colour and
    shape from the label; place from the object's centroid; size word from its
    area). The training loop's batches carry no strings (to_global_batch drops them), so the CLIP
    stage captions each image this way; it also keeps "left" and "right" true under flips.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vqkd_jax.data import shapes

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>")
CONTEXT_LENGTH = 12  # The longest caption has 8 words, + <eos>.
SIZE_WORDS = ("small", "", "large")  # By thirds of shapes.HALF_SIZE_RANGE, as caption_for.

# Area of each shape of half size 1 (units of the half size squared), from data/shapes._shape_sdf:
# circle radius 1; square of half side 0.8; equilateral triangle of inradius 0.6 (side 1.2 sqrt 3);
# cross of two 1.84 x 0.6 bars.
SHAPE_UNIT_AREAS = (math.pi, 1.6 ** 2, 3.0 * math.sqrt(3.0) * 0.6 ** 2, 2 * 1.84 * 0.6 - 0.6 ** 2)
# Centroid minus centre, downwards, in half sizes: the triangle's incentre is 0.3 below its centre.
SHAPE_CENTROID_OFFSETS = (0.0, 0.0, 0.3, 0.0)


def vocabulary() -> tuple[str, ...]:
  """All tokens, id = position: SPECIAL_TOKENS, then the grammar's words in order of appearance."""
  words = ["a", "small", "large", *shapes.COLOURS, *shapes.SHAPES]
  for phrase in shapes.POSITION_NAMES:
    words += [w for w in phrase.split() if w not in words]
  return SPECIAL_TOKENS + tuple(words)


VOCAB = vocabulary()
VOCAB_SIZE = len(VOCAB)
_WORD_IDS = {w: i for i, w in enumerate(VOCAB)}


def tokenize(captions: str | Sequence[str], context_length: int = CONTEXT_LENGTH,
             strict: bool = True) -> np.ndarray:
  """Captions -> int32 [B, context_length]: word ids, EOS_ID, then PAD_ID (lower-cased, split on
  whitespace). A single string gives B = 1.

  strict: unknown words or a caption longer than context_length - 1 words raise ValueError
  (naming them); otherwise unknown words become UNK_ID and long captions are cut."""
  if isinstance(captions, str):
    captions = [captions]
  out = np.full((len(captions), context_length), PAD_ID, np.int32)
  for row, caption in enumerate(captions):
    words = caption.lower().split()
    unknown = [w for w in words if w not in _WORD_IDS]
    if strict and unknown:
      raise ValueError(f"words outside the caption vocabulary: {unknown} in {caption!r}; known: "
                       f"{' '.join(VOCAB[len(SPECIAL_TOKENS):])}")
    if strict and len(words) > context_length - 1:
      raise ValueError(f"caption of {len(words)} words is longer than {context_length - 1}: "
                       f"{caption!r}")
    ids = [_WORD_IDS.get(w, UNK_ID) for w in words][:context_length - 1] + [EOS_ID]
    out[row, :len(ids)] = ids
  return out


def caption_from_attributes(shape: int, colour: int, cell: int, size: int) -> str:
  """The dataset's caption (shapes.caption_for) for size class 0 small, 1 (no word), 2 large."""
  lo, hi = shapes.HALF_SIZE_RANGE
  return shapes.caption_for(shape, colour, cell, lo + (size + 0.5) / 3.0 * (hi - lo))


def caption_table(context_length: int = CONTEXT_LENGTH) -> np.ndarray:
  """int32 [num shapes, num colours, 9 cells, 3 sizes, context_length]: the ids of every caption."""
  table = np.zeros((len(shapes.SHAPES), len(shapes.COLOURS), 9, 3, context_length), np.int32)
  for s, c, cell, size in np.ndindex(table.shape[:4]):
    table[s, c, cell, size] = tokenize(caption_from_attributes(s, c, cell, size), context_length)[0]
  return table


def attributes_from_annotation(labels: jax.Array, segmentation: jax.Array) -> dict:
  """What a caption says, from labels int [B] and segmentation [B, S, S] (0 = background):
  {"shape", "colour", "cell" (row * 3 + col of the object's centre: its centroid, less the
  triangle's offset), "size" (0 small, 1 middle, 2 large: the half size sqrt(area / unit area of the
  shape) by thirds of HALF_SIZE_RANGE)}, int32 [B] each. An image without object pixels gets the
  centre cell and the middle size."""
  labels = labels.astype(jnp.int32)
  s = segmentation.shape[1]
  n_colours = len(shapes.COLOURS)
  shape, colour = labels // n_colours, labels % n_colours
  obj = segmentation > 0
  present = jnp.any(obj, axis=(1, 2))
  area = jnp.mean(obj.astype(jnp.float32), axis=(1, 2))
  half = jnp.sqrt(area / jnp.asarray(SHAPE_UNIT_AREAS, jnp.float32)[jnp.clip(shape, 0, 3)])
  weights = obj.astype(jnp.float32) / jnp.maximum(jnp.sum(obj, axis=(1, 2)), 1)[:, None, None]
  coords = (jnp.arange(s, dtype=jnp.float32) + 0.5) / s
  cy = jnp.einsum("bhw,h->b", weights, coords)
  cy = cy - jnp.asarray(SHAPE_CENTROID_OFFSETS, jnp.float32)[jnp.clip(shape, 0, 3)] * half
  cx = jnp.einsum("bhw,w->b", weights, coords)
  row = jnp.clip(jnp.floor(3 * cy), 0, 2).astype(jnp.int32)
  col = jnp.clip(jnp.floor(3 * cx), 0, 2).astype(jnp.int32)
  cell = jnp.where(present, row * 3 + col, 4)
  lo, hi = shapes.HALF_SIZE_RANGE
  size = jnp.clip(jnp.floor(3 * (half - lo) / (hi - lo)), 0, 2).astype(jnp.int32)
  size = jnp.where(present, size, 1)
  return {"shape": shape, "colour": colour, "cell": cell, "size": size}


def caption_index(attributes: dict) -> jax.Array:
  """Row of caption_table().reshape(-1, L) for attributes_from_annotation's dict: int32 [B]."""
  n_colours = len(shapes.COLOURS)
  return ((attributes["shape"] * n_colours + attributes["colour"]) * 9 + attributes["cell"]) * 3 + \
      attributes["size"]


def caption_ids_from_annotation(labels: jax.Array, segmentation: jax.Array,
                                table: np.ndarray | None = None) -> jax.Array:
  """int32 [B, context_length] caption ids of each image from its label and segmentation (see
  attributes_from_annotation); `table` = caption_table() (built here when None)."""
  table = caption_table() if table is None else table
  a = attributes_from_annotation(labels, segmentation)
  return jnp.asarray(table)[a["shape"], a["colour"], a["cell"], a["size"]]
