"""Python API for notebooks and scripts: sample images from a trained pipeline.

    from vqkd_jax.api import Generator
    gen = Generator.from_workdir("runs/demo")          # finds ar/, pixel_decoder/ and the tokenizer
    images = gen.sample([0, 1, 2], cfg_scale=1.75, seed=0)   # uint8 [3, H, W, 3]
"""

from __future__ import annotations

import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vqkd_jax.train.common import to_uint8


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


class Generator:
  """A class-conditional generator: AR prior -> code indices -> pixel decoder -> uint8 images."""

  def __init__(self, ar_workdir: str, decoder_workdir: str, precision: str = "float32"):
    from vqkd_jax.train import ar as ar_stage

    self.model, self.variables, info = ar_stage.load_ar(ar_workdir, precision)
    self.num_classes = info["num_classes"]
    self.codebook_size = info["codebook_size"]
    self.grid = info["grid"]
    self.tokenizer = Tokenizer(info["tokenizer"], decoder_workdir, precision)

  @classmethod
  def from_workdir(cls, workdir: str, precision: str = "float32") -> "Generator":
    """Loads from a demo-style work directory holding `ar/` and `pixel_decoder/`."""
    for sub in ("ar", "pixel_decoder"):
      if not os.path.isdir(os.path.join(workdir, sub)):
        raise FileNotFoundError(f"{workdir} has no {sub}/ stage; run `vqkd demo --workdir {workdir}`")
    return cls(os.path.join(workdir, "ar"), os.path.join(workdir, "pixel_decoder"), precision)

  def sample_tokens(self, labels: Sequence[int], *, cfg_scale: float = 1.75,
                    temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                    batch_size: int = 256) -> np.ndarray:
    """Code indices [N, h, w] for the class `labels` (each sample depends on the seed and its
    position in `labels` only, not on batch_size)."""
    from vqkd_jax.proposal.sampling import sample

    labels = np.asarray(labels, np.int32)
    if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
      raise ValueError(f"labels must be in [0, {self.num_classes}), got {labels.min()}..{labels.max()}")
    out = []
    rng = jax.random.PRNGKey(seed)
    for start in range(0, len(labels), batch_size):
      chunk = labels[start:start + batch_size]
      n = len(chunk)
      padded = np.pad(chunk, (0, batch_size - n)) if len(labels) > batch_size else chunk
      tokens = sample(self.model, self.variables, jnp.asarray(padded),
                      num_image_tokens=self.grid[0] * self.grid[1], num_classes=self.num_classes,
                      codebook_size=self.codebook_size, rng=rng, cfg_scale=cfg_scale,
                      temperature=temperature, top_k=top_k, top_p=top_p,
                      example_offset=start)
      out.append(np.asarray(tokens)[:n])
    tokens = np.concatenate(out) if out else np.zeros((0, self.grid[0] * self.grid[1]), np.int32)
    return tokens.reshape(-1, *self.grid)

  def sample(self, labels: Sequence[int], **kwargs) -> np.ndarray:
    """uint8 images [N, H, W, 3] for the class `labels`; kwargs as `sample_tokens`."""
    return self.tokenizer.decode(self.sample_tokens(labels, **kwargs))


def bench_sampling(config, steps: int = 3) -> dict:
  """Images per second of AR sampling with a randomly initialised model of config.model's size."""
  import time

  from vqkd_jax.proposal.sampling import sample
  from vqkd_jax.train import ar as ar_stage

  b = config.batch_size
  num_tokens = config.bench.grid * config.bench.grid
  model = ar_stage.build_model(config.model, num_classes=config.data.num_classes,
                               codebook_size=config.bench.codebook_size,
                               num_image_tokens=num_tokens, precision=config.precision)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1 + num_tokens), jnp.int32),
                      train=False)
  labels = jnp.arange(b) % config.data.num_classes
  run = lambda seed: sample(model, params, labels, num_image_tokens=num_tokens,
                            num_classes=config.data.num_classes,
                            codebook_size=config.bench.codebook_size,
                            rng=jax.random.PRNGKey(seed), cfg_scale=config.sampling.cfg_scale,
                            temperature=1.0, top_k=config.sampling.top_k,
                            top_p=config.sampling.top_p)
  jax.block_until_ready(run(0))
  start = time.perf_counter()
  for i in range(steps):
    jax.block_until_ready(run(i + 1))
  seconds = (time.perf_counter() - start) / steps
  return {"what": "ar sampling", "device": jax.devices()[0].device_kind,
          "precision": config.precision, "batch": b, "tokens": num_tokens,
          "cfg": config.sampling.cfg_scale, "seconds/batch": f"{seconds:.3f}",
          "images/s": f"{b / seconds:.0f}"}


def bench_nar_sampling(config, steps: int = 3) -> dict:
  """Images per second of parallel (masked-token) decoding with a randomly initialised NAR model of
  config.model's size: config.sampling.steps decoding steps, batch config.bench.batch_size, CFG as
  config.sampling (the conditional and unconditional halves in one forward of twice the batch).
  `steps` timed calls after a compiling one. TFLOP/s from the model FLOPs of the whole call."""
  import time

  import flax.linen as nn

  from vqkd_jax.bench import step_flops
  from vqkd_jax.proposal import nar as nar_lib
  from vqkd_jax.train import nar as nar_stage

  b = config.bench.get("batch_size", config.batch_size)
  num_tokens = config.bench.grid * config.bench.grid
  model = nar_stage.build_model(config.model, num_classes=config.data.num_classes,
                                codebook_size=config.bench.codebook_size,
                                num_image_tokens=num_tokens, precision=config.precision)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 1 + num_tokens), jnp.int32))
  params = nn.meta.unbox(params["params"])
  s = config.sampling
  labels = jnp.arange(b) % config.data.num_classes
  run = lambda rng: nar_lib.sample(model, params, labels, rng=rng, steps=s.steps,
                                   cfg_scale=s.cfg_scale, cfg_schedule=s.cfg_schedule,
                                   temperature=s.temperature,
                                   choice_temperature=s.choice_temperature)
  jax.block_until_ready(run(jax.random.PRNGKey(0)))
  start = time.perf_counter()
  for i in range(steps):
    jax.block_until_ready(run(jax.random.PRNGKey(i + 1)))
  seconds = (time.perf_counter() - start) / steps
  tflops = step_flops(run, jax.random.PRNGKey(0)) / seconds / 1e12
  return {"what": "nar sampling", "device": jax.devices()[0].device_kind,
          "precision": config.precision, "batch": b, "tokens": num_tokens,
          "decoding_steps": s.steps, "cfg": s.cfg_scale, "seconds/batch": f"{seconds:.3f}",
          "images/s": f"{b / seconds:.0f}", "TFLOP/s": f"{tflops:.3g}"}
