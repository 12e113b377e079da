"""Python API for notebooks and scripts: sample images from a trained pipeline.

    from vqkd_jax.api import Generator
    gen = Generator.from_checkpoint("runs/demo")   # finds ar/ (or nar/), pixel_decoder/, tokenizer
    images = gen.sample([0, 1, 2], cfg_scale=1.75, seed=0)   # uint8 [3, H, W, 3]
    gen = Generator.from_checkpoint("runs/demo", kind="nar")   # the masked-token network
    images = gen.sample([0, 1, 2], steps=8)
    gen = Generator.from_checkpoint("runs/demo", kind="t2i")   # text-to-image: prompts
    images = gen.sample(["a large red circle at the top left", "a blue square"], seed=0)
    gen.proposal    # the t2i stage's network, "ar" or "nar" (NAR: steps=, choice_temperature=)
"""

from __future__ import annotations

import functools
import itertools
import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vqkd_jax.train.common import to_uint8


@functools.lru_cache(maxsize=None)
def _local_data_mesh():
  """parallel.mesh.make_mesh's mesh of this process's devices on the "data" axis when there are
  several and one process (the Generator's data-parallel sampling), else None."""
  from vqkd_jax.parallel.mesh import make_mesh

  devices = jax.local_devices()
  if len(devices) < 2 or jax.process_count() > 1:
    return None
  return make_mesh({"data": len(devices)}, devices)


def _split_rows(rows: np.ndarray, mesh) -> jax.Array:
  """rows [N, ...] on one device (mesh None), or padded to a multiple of the mesh size (repeating
  the last row) and split over its batch axes (the padded rows' samples are past the caller's
  rows and dropped)."""
  if mesh is None:
    return jnp.asarray(rows)
  from vqkd_jax.parallel.mesh import batch_sharding

  rows = np.asarray(rows)
  pad = [(0, -len(rows) % mesh.size)] + [(0, 0)] * (rows.ndim - 1)
  return jax.device_put(np.pad(rows, pad, "edge"), batch_sharding(mesh))


class Tokenizer:
  """A frozen tokenizer (any tokenizer stage) and its pixel decoder: images <-> code indices.

  VQGAN and FSQ tokenizers decode pixels themselves; VQ-KD and Cluster codes need the pixel decoder
  trained on them (`decoder_workdir`)."""

  def __init__(self, tokenizer, decoder_workdir: str | None = None, precision: str = "float32"):
    """`tokenizer`: a work directory or an already loaded tokenizers.frozen.FrozenTokenizer."""
    from vqkd_jax.tokenizers.frozen import load_frozen_tokenizer
    from vqkd_jax.train import pixel_decoder as decoder_stage

    self.frozen = (load_frozen_tokenizer(tokenizer, precision) if isinstance(tokenizer, str)
                   else tokenizer)
    self.variables = self.frozen.variables
    self.num_codes = self.frozen.num_codes
    self._encode = jax.jit(self.frozen.encode)
    self._decode = None
    if self.frozen.decode is not None:
      self._decode = jax.jit(lambda idx: self.frozen.decode(self.variables, idx))
    elif decoder_workdir is not None:
      decoder, decoder_vars = decoder_stage.load_decoder(decoder_workdir, precision)

      def decode(tok_vars, dec_vars, indices):
        z = self.frozen.lookup(tok_vars, indices)
        return to_uint8(decoder.apply(dec_vars, z))

      self._decode = jax.jit(lambda idx: decode(self.variables, decoder_vars, idx))

  def encode(self, images_uint8: np.ndarray) -> np.ndarray:
    """uint8 images [B, H, W, 3] -> int32 code indices [B, h, w]."""
    return np.asarray(self._encode(self.variables, jnp.asarray(images_uint8)))

  def decode(self, indices: np.ndarray) -> np.ndarray:
    """Code indices [B, h, w] -> uint8 images [B, H, W, 3] (VQ-KD / Cluster: needs the pixel
    decoder)."""
    if self._decode is None:
      raise ValueError(f"this {self.frozen.stage} tokenizer was loaded without a pixel decoder")
    return np.asarray(self._decode(jnp.asarray(indices)))


PROPOSAL_STAGES = ("ar", "nar", "t2i")   # ar / nar: sample(class labels); t2i: sample(prompts)


class SamplingError(ValueError):
  """A wrong proposal kind, label or sampling setting; the message fits one line."""


def _saved_stage(workdir: str) -> str | None:
  """The `stage` of the config saved in workdir/config.json (None when there is none)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f).get("stage")


def _train_command(kind: str, root: str, tokenizer: str | None = None) -> str:
  """The command that makes stage `kind` in the demo-style directory `root`."""
  tokenizer = tokenizer or os.path.join(root, "tokenizer")
  if kind == "tokenizer":
    return f"`vqkd demo --workdir {root}` (makes {root}/tokenizer)"
  if kind == "teacher_clip":
    return f"`vqkd train --config configs/demo/teacher_clip.py --workdir {root}`"
  config = {"ar": "ar", "nar": "nar", "t2i": "t2i", "pixel_decoder": "pixel_decoder"}[kind]
  extra = ""
  if kind == "t2i":
    extra = (f" --config.text_encoder.workdir=<a teacher_clip stage> "
             f"--config.pixel_decoder_workdir={os.path.join(root, 'pixel_decoder')}")
  command = (f"`vqkd train --config configs/demo/{config}.py --workdir {os.path.join(root, kind)} "
             f"--config.tokenizer_workdir={tokenizer}{extra}`")
  return command if kind == "nar" else f"{command} (or `vqkd demo --workdir {root}`)"


# The row a multi-row demo directory (configs/demo/demo.py: <workdir>/<row>/<stage>) gives by
# default: VQ-KD distilled from the CLIP-style teacher, the paper's tokenizer.
DEFAULT_ROW = "vqkd_clip"


def _has_proposal(workdir: str) -> bool:
  return any(_saved_stage(os.path.join(workdir, k)) == k for k in PROPOSAL_STAGES)


def demo_rows(path: str) -> list[str]:
  """The rows of a multi-row demo directory: its subdirectories holding ar/, nar/ or t2i/,
  sorted."""
  if not os.path.isdir(path):
    return []
  return sorted(d for d in os.listdir(path) if _has_proposal(os.path.join(path, d)))


def find_proposal(path: str, kind: str | None = None, row: str | None = None) -> tuple[str, str]:
  """(work directory, kind) of the proposal network that `path` names: `path` is the work
  directory of an ar, nar or t2i stage (its config.json's stage), or a demo-style directory
  holding some of ar/, nar/, t2i/ (kind picks one; default: the first of ar, nar, t2i there), or a
  multi-row demo directory whose row directories are demo-style (row picks one; default: the only
  row, else DEFAULT_ROW).
  Raises FileNotFoundError naming what is missing and the command that makes it."""
  if kind is not None and kind not in PROPOSAL_STAGES:
    raise SamplingError(f"kind must be one of {PROPOSAL_STAGES} or None, got {kind!r}")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path} does not exist; make it with `vqkd demo --workdir {path}`")
  rows = demo_rows(path)
  if row is not None:
    if row not in rows:
      raise FileNotFoundError(f"{path} has no row {row!r} holding ar/, nar/ or t2i/ (rows: "
                              f"{', '.join(rows) or 'none'})")
    path = os.path.join(path, row)
  elif not _has_proposal(path) and _saved_stage(path) is None and rows:
    if len(rows) > 1 and DEFAULT_ROW not in rows:
      raise FileNotFoundError(f"{path} holds the rows {', '.join(rows)}: pick one with row=")
    path = os.path.join(path, rows[0] if len(rows) == 1 else DEFAULT_ROW)
  stage = _saved_stage(path)
  if stage in PROPOSAL_STAGES:
    if kind is not None and kind != stage:
      raise SamplingError(f"{path} holds a {stage} stage, not {kind}")
    return path, stage
  if stage is not None:
    raise SamplingError(f"{path} holds a {stage!r} stage, not a proposal network "
                        f"({', '.join(PROPOSAL_STAGES)}); pass its demo work directory or the work "
                        f"directory of an ar, nar or t2i stage")
  found = [k for k in PROPOSAL_STAGES if _saved_stage(os.path.join(path, k)) == k]
  if kind is None and found:
    kind = found[0]
  if kind is None:
    raise FileNotFoundError(f"{path} holds no proposal stage (ar/, nar/ or t2i/): train one "
                            f"with {_train_command('ar', path)} or {_train_command('nar', path)}")
  if kind not in found:
    raise FileNotFoundError(f"{path} has no {kind}/ stage: train it with "
                            f"{_train_command(kind, path)}")
  return os.path.join(path, kind), kind


def _saved_config(workdir: str) -> dict:
  with open(os.path.join(workdir, "config.json")) as f:
    return json.load(f)


def find_text_encoder(t2i_workdir: str) -> str | None:
  """Where the text encoder of a t2i stage is, for load_t2i's `text_encoder`: kind in_the_box, the
  config's text_encoder.workdir, or, when that path is gone (the runs moved), the teacher_clip
  stage of the demo layout (<row>/../shared/teacher_clip) or a sibling teacher_clip/; None for
  other kinds (hf_clip: the config's path is used as saved)."""
  saved_cfg = _saved_config(t2i_workdir).get("text_encoder") or {}
  if saved_cfg.get("kind") != "in_the_box":
    return None
  saved = saved_cfg.get("workdir") or ""
  if saved and _saved_stage(saved) == "teacher_clip":
    return saved
  root = os.path.dirname(os.path.abspath(t2i_workdir))
  candidates = (os.path.join(os.path.dirname(root), "shared", "teacher_clip"),
                os.path.join(root, "teacher_clip"))
  for candidate in candidates:
    if _saved_stage(candidate) == "teacher_clip":
      return candidate
  raise FileNotFoundError(
      f"the text encoder of {t2i_workdir} is missing: neither its config's text_encoder.workdir "
      f"({saved or 'unset'}) nor {' or '.join(candidates)} holds a teacher_clip stage; pass "
      f"text_encoder= or make one with {_train_command('teacher_clip', candidates[0])}")


def find_tokenizer(proposal_workdir: str) -> str:
  """The tokenizer work directory of a proposal stage: its config's tokenizer_workdir, or, when
  that path is gone (the runs moved), the sibling tokenizer/ of a demo-style directory."""
  with open(os.path.join(proposal_workdir, "config.json")) as f:
    saved = json.load(f).get("tokenizer_workdir") or ""
  if saved and _saved_stage(saved) is not None:
    return saved
  root = os.path.dirname(os.path.abspath(proposal_workdir))
  sibling = os.path.join(root, "tokenizer")
  if _saved_stage(sibling) is not None:
    return sibling
  raise FileNotFoundError(
      f"the tokenizer of {proposal_workdir} is missing: neither its config's tokenizer_workdir "
      f"({saved or 'unset'}) nor {sibling} holds a trained stage; pass tokenizer= or make one "
      f"with {_train_command('tokenizer', root)}")


class Generator:
  """A generator: proposal network (AR, NAR or T2I) -> code indices -> pixels.

  `kind` is "ar" (class-conditional, autoregressive, KV-cached sampling), "nar" (class-conditional,
  masked-token parallel decoding) or "t2i" (text-conditioned, by a frozen text encoder's caption
  states as a prefix or through cross-attention; `proposal` says which network: "ar" or "nar", as
  the stage's config). ar / nar sample from class labels (ints), t2i from text prompts (strings).
  The tokenizer decodes the codes itself (VQGAN, FSQ) or through its pixel decoder (VQ-KD,
  Cluster). Load with `Generator.from_checkpoint(path)`."""

  def __init__(self, proposal_workdir: str, decoder_workdir: str | None = None,
               precision: str = "float32", *, tokenizer=None, text_encoder=None):
    """proposal_workdir: an ar, nar or t2i stage's work directory; decoder_workdir: the pixel
    decoder stage (None for tokenizers that decode themselves); tokenizer: a work directory or a
    loaded FrozenTokenizer (default: the proposal config's tokenizer_workdir); text_encoder (t2i):
    a loaded FrozenTextEncoder or the place of the config's one (see train.t2i.load_t2i; default:
    the config's text_encoder)."""
    from vqkd_jax.train import ar as ar_stage
    from vqkd_jax.train import nar as nar_stage
    from vqkd_jax.train import t2i as t2i_stage

    self.kind = _saved_stage(proposal_workdir)
    if self.kind not in PROPOSAL_STAGES:
      raise SamplingError(f"{proposal_workdir} holds a {self.kind!r} stage, not a proposal "
                          f"network ({', '.join(PROPOSAL_STAGES)})")
    self.text_encoder = None                         # t2i: the FrozenTextEncoder
    self.proposal = self.kind                        # the network: "ar" or "nar"
    if self.kind == "t2i":
      self.model, self.variables, info = t2i_stage.load_t2i(
          proposal_workdir, precision, tokenizer=tokenizer, text_encoder=text_encoder)
      self.text_encoder = info["text_encoder"]
      self.proposal = info["proposal"]
      self.num_classes = None
    else:
      if text_encoder is not None:
        raise SamplingError(f"text_encoder= is for t2i stages; {proposal_workdir} holds a "
                            f"{self.kind} stage")
      load = ar_stage.load_ar if self.kind == "ar" else nar_stage.load_nar
      self.model, self.variables, info = load(proposal_workdir, precision, tokenizer=tokenizer)
      self.num_classes = info["num_classes"]
    self.codebook_size = info["codebook_size"]
    self.grid = info["grid"]
    self.sampling = info.get("sampling", {})  # NAR (and t2i): the stage config's decoding settings
    self.tokenizer = Tokenizer(info["tokenizer"], decoder_workdir, precision)

  @classmethod
  def from_checkpoint(cls, path: str, precision: str = "float32", *, kind: str | None = None,
                      row: str | None = None, decoder: str | None = None,
                      tokenizer: str | None = None,
                      text_encoder: str | None = None) -> "Generator":
    """Everything from one path: a demo-style work directory (some of ar/, nar/, t2i/, with
    tokenizer/, pixel_decoder/), a multi-row demo directory (<path>/<row>/ demo-style), or one
    proposal stage's work directory.

    kind: "ar" | "nar" | "t2i" | None, which proposal network of a demo directory (default: the
    first of ar, nar, t2i there). row: which row of a multi-row demo (default: the only one, else
    DEFAULT_ROW, "vqkd_clip").
    The tokenizer is the proposal config's tokenizer_workdir, or the sibling tokenizer/ when that
    path moved (or `tokenizer`); when it cannot decode pixels itself the pixel decoder is `decoder`,
    else (t2i) the config's pixel_decoder_workdir when it holds one, else the sibling
    pixel_decoder/. t2i: the text encoder is the config's, its in-the-box teacher_clip stage found
    as find_text_encoder says (or `text_encoder`). A missing piece raises FileNotFoundError naming
    it and the command that makes it."""
    from vqkd_jax.tokenizers.frozen import load_frozen_tokenizer

    proposal, kind = find_proposal(path, kind, row)
    frozen = load_frozen_tokenizer(tokenizer or find_tokenizer(proposal), precision)
    if frozen.decode is not None:
      decoder = None
    elif decoder is None:
      root = os.path.dirname(os.path.abspath(proposal))
      saved = (_saved_config(proposal).get("pixel_decoder_workdir") or "") if kind == "t2i" else ""
      decoder = os.path.join(root, "pixel_decoder")
      if saved and _saved_stage(saved) == "pixel_decoder":
        decoder = saved
      elif _saved_stage(decoder) != "pixel_decoder":
        raise FileNotFoundError(
            f"{frozen.stage} codes need a pixel decoder and {decoder} holds none: pass decoder= "
            f"or train one with {_train_command('pixel_decoder', root)}")
    elif _saved_stage(decoder) != "pixel_decoder":
      raise FileNotFoundError(f"{decoder} holds no pixel_decoder stage")
    if kind == "t2i":
      text_encoder = text_encoder or find_text_encoder(proposal)
    elif text_encoder is not None:
      raise SamplingError(f"text_encoder= is for t2i stages, not {kind}")
    return cls(proposal, decoder, precision, tokenizer=frozen, text_encoder=text_encoder)

  @classmethod
  def from_workdir(cls, workdir: str, precision: str = "float32", **kwargs) -> "Generator":
    """Alias of from_checkpoint (kept for earlier callers)."""
    return cls.from_checkpoint(workdir, precision, **kwargs)

  def encode_prompts(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """t2i: text prompts [N] -> (caption ids int32 [N, L], mask bool [N, L]) by the text encoder's
    caption tokenizer. The in-the-box tokenizer knows the built-in captions' words only: a prompt
    with other words (or too many) raises SamplingError naming them."""
    if self.kind != "t2i":
      raise SamplingError(f"this {self.kind} generator samples from class labels; text prompts "
                          f"need a t2i stage (kind='t2i')")
    prompts = self._prompts(prompts)
    if self.text_encoder.kind == "in_the_box":
      from vqkd_jax.teachers import in_the_box_captions as captions
      vocab = captions.VOCAB[len(captions.SPECIAL_TOKENS):]
      unknown = {}                                   # word -> indices of the prompts using it
      for i, p in enumerate(prompts):
        for w in p.lower().split():
          if w not in vocab and i not in unknown.setdefault(w, []):
            unknown[w].append(i)
      if unknown:
        words = ", ".join(f"{w!r} (prompt {', '.join(map(str, i))})" for w, i in unknown.items())
        raise SamplingError(f"the in-the-box caption tokenizer does not know the words {words}; "
                            f"it knows: {' '.join(vocab)}")
    try:
      ids, mask = self.text_encoder.tokenize(prompts)
    except ValueError as e:                  # e.g. an in-the-box caption of too many words
      raise SamplingError(str(e)) from e
    return np.asarray(ids, np.int32), np.asarray(mask, bool)

  def _prompts(self, prompts) -> list[str]:
    """t2i inputs as a list of str (one string: one prompt); anything else: SamplingError."""
    if isinstance(prompts, str):
      return [prompts]
    prompts = (list(prompts) if isinstance(prompts, (list, tuple))
               else list(np.asarray(prompts, dtype=object).reshape(-1)))
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
      raise SamplingError(f"a t2i generator samples from text prompts (a list of str), got "
                          f"{type(bad[0]).__name__} {bad[0]!r}; class labels need an ar or nar "
                          f"stage (kind='ar' or 'nar')")
    return [str(p) for p in prompts]

  def _labels(self, labels) -> np.ndarray:
    """ar / nar inputs as int32 [N]; text prompts: SamplingError."""
    items = ([labels] if isinstance(labels, (str, bytes)) else
             list(labels) if isinstance(labels, (list, tuple)) else np.asarray(labels).reshape(-1))
    if any(isinstance(x, (str, bytes)) for x in items):
      raise SamplingError(f"this {self.kind} generator samples from class labels (ints in "
                          f"[0, {self.num_classes})), got text; text prompts need a t2i stage "
                          f"(kind='t2i')")
    labels = np.asarray(labels).reshape(-1)
    if labels.size and labels.dtype.kind not in "iu":
      raise SamplingError(f"class labels must be ints, got {labels.dtype} values")
    return labels.astype(np.int32)

  def sample_tokens(self, labels: Sequence[int] | Sequence[str] | None = None, *,
                    prompts: Sequence[str] | None = None, cfg_scale: float = 1.75,
                    temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                    batch_size: int = 256, steps: int | None = None,
                    choice_temperature: float | None = None) -> np.ndarray:
    """Code indices int32 [N, h, w] for the class `labels` [N] (ar, nar) or the text prompts [N]
    (t2i: a list of str, as the first argument or prompts=). Each sample depends on the seed and
    its position in the list only, not on batch_size.

    All kinds: cfg_scale (1 or None: no guidance), temperature (0: argmax). AR (and T2I with an
    AR network): top_k (0: off), top_p (1: off). NAR (and T2I with a NAR network): steps and
    choice_temperature (default: the stage config's sampling group; its cfg_schedule applies). A
    setting the network does not use, ints for t2i or strings for ar / nar raise SamplingError.

    With several local devices (one process), each chunk's rows are split over them
    (data-parallel; chunks padded to a multiple of the device count), the parameters replicated
    once: the same tokens as on one device. AR (and T2I's AR) decodes each device's rows in its
    own loop (`sampling.batch_split`), NAR lets XLA's partitioner split its jitted decoding by the
    rows."""
    from vqkd_jax.proposal import nar as nar_lib
    from vqkd_jax.proposal.sampling import sample as ar_sample

    if prompts is not None:
      if labels is not None:
        raise SamplingError("pass labels or prompts=, not both")
      if self.kind != "t2i":
        raise SamplingError(f"prompts= needs a t2i generator; this {self.kind} one samples from "
                            f"class labels (kind='t2i' picks the text-to-image stage)")
      labels = prompts
    if labels is None:
      raise SamplingError("nothing to sample: pass " + ("text prompts" if self.kind == "t2i"
                                                         else "class labels"))
    if batch_size < 1:
      raise SamplingError(f"batch_size must be >= 1, got {batch_size}")
    if self.kind == "t2i":
      settings = dict(cfg_scale=cfg_scale, temperature=temperature)
      if self.proposal == "nar":
        settings.update(self._nar_settings(top_k, top_p, steps, choice_temperature))
      elif steps is not None or choice_temperature is not None:
        raise SamplingError("steps and choice_temperature set NAR decoding; this T2I stage's AR "
                            "network draws one token per step and does not use them")
      else:
        settings.update(top_k=top_k, top_p=top_p)
      return self._sample_t2i(labels, seed=seed, batch_size=batch_size, **settings)
    labels = self._labels(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
      raise SamplingError(f"labels must be in [0, {self.num_classes}), got "
                          f"{labels.min()}..{labels.max()}")
    num_tokens = self.grid[0] * self.grid[1]
    mesh = _local_data_mesh()
    variables = self.variables if mesh is None else self._replicated_variables
    if self.kind == "nar":
      settings = self._nar_settings(top_k, top_p, steps, choice_temperature)
      draw = lambda chunk, rng, start: nar_lib.sample(
          self.model, variables, _split_rows(chunk, mesh), rng=rng, cfg_scale=cfg_scale,
          temperature=temperature, example_offset=start, num_image_tokens=num_tokens, **settings)
    else:
      if steps is not None or choice_temperature is not None:
        raise SamplingError("steps and choice_temperature set NAR decoding; AR sampling draws one "
                            "token per step and does not use them")
      draw = lambda chunk, rng, start: ar_sample(
          self.model, variables, _split_rows(chunk, mesh), num_image_tokens=num_tokens,
          num_classes=self.num_classes, codebook_size=self.codebook_size, rng=rng,
          cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, top_p=top_p,
          example_offset=start)
    out = []
    rng = jax.random.PRNGKey(seed)
    for start in range(0, len(labels), batch_size):
      chunk = labels[start:start + batch_size]
      n = len(chunk)
      # Every chunk of a long list has batch_size rows (one compilation); padded rows are dropped.
      padded = np.pad(chunk, (0, batch_size - n)) if len(labels) > batch_size else chunk
      out.append(np.asarray(draw(padded, rng, start))[:n])
    tokens = np.concatenate(out) if out else np.zeros((0, num_tokens), np.int32)
    return tokens.reshape(-1, *self.grid)

  @functools.cached_property
  def _replicated_variables(self):
    """self.variables (t2i: with the text encoder's, a pair) on every device of
    _local_data_mesh() (copied once)."""
    from vqkd_jax.parallel.mesh import replicated

    tree = self.variables if self.kind != "t2i" else (self.variables, self.text_encoder.variables)
    return jax.device_put(tree, replicated(_local_data_mesh()))

  def _nar_settings(self, top_k, top_p, steps, choice_temperature) -> dict:
    """NAR decoding settings: the stage config's (steps, cfg_schedule, choice_temperature) unless
    given; top_k / top_p other than off raise SamplingError."""
    if top_k or (top_p is not None and top_p != 1.0):
      raise SamplingError("top_k and top_p filter AR sampling; NAR decoding does not use them "
                          "(it takes steps, temperature and choice_temperature)")
    settings = {k: self.sampling[k] for k in ("steps", "cfg_schedule", "choice_temperature")
                if k in self.sampling}
    if steps is not None:
      settings["steps"] = steps
    if choice_temperature is not None:
      settings["choice_temperature"] = choice_temperature
    return settings

  def _sample_t2i(self, prompts, *, seed, batch_size, **settings) -> np.ndarray:
    """Codes [N, h, w] of text prompts: train.t2i.sample_images (with `settings`) per chunk of
    batch_size, the chunk's start as example_offset (so a sample does not depend on the
    chunking)."""
    from vqkd_jax.train.t2i import sample_images

    ids, mask = self.encode_prompts(prompts)
    n = len(ids)
    mesh = _local_data_mesh()
    model_vars, text_vars = ((self.variables, self.text_encoder.variables) if mesh is None else
                             self._replicated_variables)
    out = []
    rng = jax.random.PRNGKey(seed)
    for start in range(0, n, batch_size):
      chunk_ids, chunk_mask = ids[start:start + batch_size], mask[start:start + batch_size]
      m = len(chunk_ids)
      if n > batch_size:     # every chunk batch_size rows (one compilation); padding dropped
        pad = ((0, batch_size - m), (0, 0))
        chunk_ids, chunk_mask = np.pad(chunk_ids, pad, "edge"), np.pad(chunk_mask, pad, "edge")
      codes = sample_images(self.model, model_vars, self.text_encoder, text_vars,
                            _split_rows(chunk_ids, mesh), _split_rows(chunk_mask, mesh), rng=rng,
                            example_offset=start, **settings)
      out.append(np.asarray(codes)[:m])
    num_tokens = self.grid[0] * self.grid[1]
    tokens = np.concatenate(out) if out else np.zeros((0, num_tokens), np.int32)
    return tokens.reshape(-1, *self.grid)

  def sample(self, labels: Sequence[int] | Sequence[str] | None = None, **kwargs) -> np.ndarray:
    """uint8 images [N, H, W, 3] for the class `labels` [N] (ar, nar) or the text prompts [N]
    (t2i; or prompts=); kwargs as `sample_tokens` (prompts, cfg_scale, temperature, top_k, top_p,
    seed, batch_size, steps, choice_temperature)."""
    return self.tokenizer.decode(self.sample_tokens(labels, **kwargs))


def _check_bench_group(config) -> None:
  """`vqkd bench sample` times a randomly initialised model of the size that config.bench names
  (grid, codebook_size: no tokenizer needed) with the sampling settings of config.sampling."""
  from vqkd_jax.config import ConfigError

  missing = [k for k in ("bench", "sampling") if config.get(k) is None]
  if missing:
    raise ConfigError(f"`vqkd bench sample` needs the config's {' and '.join(missing)} group(s) "
                      f"(bench: grid, codebook_size; sampling: the decoding settings), as "
                      f"configs/demo/nar.py and configs/imagenet/nar.py have")


def _spread_head(variables, std: float = 0.02):
  """variables with a zero-initialised output head (the Llama flavour's, as LlamaGen's) drawn from
  N(0, std^2) instead, as the GPT-2 flavour's: with every logit equal, the filtered draw's
  searches end at once (nn/filtered_draw.py) and a benchmark would time a step no trained model
  takes."""
  head = variables.get("params", {}).get("head")
  if head is None or bool(jnp.any(head["kernel"])):
    return variables
  kernel = head["kernel"]
  spread = std * jax.random.normal(jax.random.PRNGKey(1), kernel.shape, jnp.float32)
  params = {**variables["params"], "head": {**head, "kernel": spread.astype(kernel.dtype)}}
  return {**variables, "params": params}


def _random_variables(init_fn):
  """init_fn(rng) -> variables, unboxed, on the default device; computed where the training loop
  computes its initial state (train/loop.init_sharded: on the host on GPUs, whose compiler takes
  minutes over the random initialisers of a 300M-parameter model)."""
  import flax.linen as nn

  from vqkd_jax.train.loop import init_sharded

  fn = lambda rng: nn.meta.unbox(init_fn(rng))
  rng = jax.random.PRNGKey(0)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return init_sharded(fn, rng, jax.tree.map(lambda _: device, jax.eval_shape(fn, rng)))


def _time_calls(run, steps: int) -> tuple[float, float, Any]:
  """(seconds of the first, compiling call; mean seconds of `steps` later calls; the first call's
  output) of run(seed), the first call with seed 0."""
  import time

  start = time.perf_counter()
  output = jax.block_until_ready(run(0))
  first = time.perf_counter() - start
  start = time.perf_counter()
  for i in range(steps):
    jax.block_until_ready(run(i + 1))
  return first, (time.perf_counter() - start) / steps, output


def bench_sampling(config, steps: int = 3) -> list[dict]:
  """Images per second of AR sampling with a randomly initialised model of config.model's size:
  rows with config.sampling's CFG and filters and rows without guidance (half the rows per step),
  one per decoding-kernel layout of config.bench.decode_kernels (default: every one of
  sampling.DECODE_KERNELS), decoding step of config.bench.decode_step (default: the model's
  decode_step) and way of drawing of config.bench.draw (default: "auto", the kernel on GPUs). A
  zero-initialised head (Llama's) is drawn at random (`_spread_head`): equal logits would time a
  draw no trained model takes, and would give every path the same tokens. "same tokens": the
  fraction of seed 0's tokens equal to those of the first row with the same guidance ("ref")."""
  from vqkd_jax.proposal.sampling import DECODE_KERNELS, resolve_draw, sample
  from vqkd_jax.train import ar as ar_stage

  _check_bench_group(config)
  b = config.batch_size
  num_tokens = config.bench.grid * config.bench.grid
  model = ar_stage.build_model(config.model, num_classes=config.data.num_classes,
                               codebook_size=config.bench.codebook_size,
                               num_image_tokens=num_tokens, precision=config.precision)
  params = _spread_head(_random_variables(
      lambda rng: model.init(rng, jnp.zeros((1, 1 + num_tokens), jnp.int32), train=False)))
  labels = jnp.arange(b) % config.data.num_classes
  rows, first_tokens = [], {}
  decode_steps = config.bench.get("decode_step", (model.decode_step,))
  for cfg, step, kernels, draw in itertools.product(
      dict.fromkeys((config.sampling.cfg_scale, None)), decode_steps,
      config.bench.get("decode_kernels", DECODE_KERNELS), config.bench.get("draw", ("auto",))):
    decoder = model.clone(decode_step=step)
    run = lambda seed: sample(decoder, params, labels, num_image_tokens=num_tokens,
                              num_classes=config.data.num_classes,
                              codebook_size=config.bench.codebook_size,
                              rng=jax.random.PRNGKey(seed), cfg_scale=cfg, temperature=1.0,
                              top_k=config.sampling.top_k, top_p=config.sampling.top_p,
                              decode_kernels=kernels, draw=draw)
    compile_s, seconds, tokens = _time_calls(run, steps)
    tokens = np.asarray(tokens)
    same = (f"{np.mean(tokens == first_tokens[cfg]):.3f}" if cfg in first_tokens else "ref")
    first_tokens.setdefault(cfg, tokens)
    rows.append({"what": "ar sampling", "device": jax.devices()[0].device_kind,
                 "precision": config.precision, "batch": b, "tokens": num_tokens,
                 "cfg": cfg or "off", "top_k": config.sampling.top_k,
                 "top_p": config.sampling.top_p, "kernels": kernels,
                 "decode_step": decoder.decode_step_path(), "draw": resolve_draw(draw),
                 "first call s": f"{compile_s:.1f}", "seconds/batch": f"{seconds:.3f}",
                 "images/s": f"{b / seconds:.0f}", "same tokens": same})
  return rows


def bench_nar_sampling(config, steps: int = 3) -> list[dict]:
  """Images per second of parallel (masked-token) decoding with a randomly initialised NAR model of
  config.model's size: config.sampling.steps decoding steps, batch config.bench.batch_size; one
  row with config.sampling's CFG (the conditional and unconditional halves in one forward of twice
  the batch), one without (as the MaskGIT decoder it is compared with). `steps` timed calls after
  a compiling one. TFLOP/s from the model FLOPs of the whole call."""
  from vqkd_jax.bench import step_flops
  from vqkd_jax.proposal import nar as nar_lib
  from vqkd_jax.train import nar as nar_stage

  _check_bench_group(config)
  b = config.bench.get("batch_size", config.batch_size)
  num_tokens = config.bench.grid * config.bench.grid
  model = nar_stage.build_model(config.model, num_classes=config.data.num_classes,
                                codebook_size=config.bench.codebook_size,
                                num_image_tokens=num_tokens, precision=config.precision)
  params = _random_variables(
      lambda rng: model.init(rng, jnp.zeros((1, 1 + num_tokens), jnp.int32)))["params"]
  s = config.sampling
  labels = jnp.arange(b) % config.data.num_classes
  rows = []
  for cfg in dict.fromkeys((s.cfg_scale, None)):
    run = lambda seed: nar_lib.sample(model, params, labels, rng=jax.random.PRNGKey(seed),
                                      steps=s.steps, cfg_scale=cfg, cfg_schedule=s.cfg_schedule,
                                      temperature=s.temperature,
                                      choice_temperature=s.choice_temperature)
    compile_s, seconds, _ = _time_calls(run, steps)
    tflops = step_flops(run, 0) / seconds / 1e12
    rows.append({"what": "nar sampling", "device": jax.devices()[0].device_kind,
                 "precision": config.precision, "batch": b, "tokens": num_tokens,
                 "decoding_steps": s.steps, "cfg": cfg or "off",
                 "first call s": f"{compile_s:.1f}", "seconds/batch": f"{seconds:.3f}",
                 "images/s": f"{b / seconds:.0f}", "TFLOP/s": f"{tflops:.3g}"})
  return rows
