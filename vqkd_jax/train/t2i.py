"""Stage "t2i": a text-conditioned transformer over image tokens, autoregressive or masked-token.

A frozen text encoder (teachers/text_encoders.py; config.text_encoder.kind "in_the_box", the
caption tower of a teacher_clip stage, or "hf_clip", a Hugging Face CLIP text tower) maps each
caption to per-token states [B, L, Dt] and a padding mask; proposal/t2i projects them to the
transformer's width (layouts and CFG in that module):

  config.proposal      "ar" (TextConditionedAR: next-token cross-entropy of the image tokens, the
                       vocabulary the codebook) or "nar" (TextConditionedNAR: MaskGIT / MAGE
                       masking as the nar stage, cross-entropy on the masked tokens with
                       config.label_smoothing, parallel decoding)
  config.conditioning  "prefix" (L prefix embeddings ahead of the image tokens) or
                       "cross_attention" (every block attends to the L projected states under the
                       caption's padding mask)

With probability config.caption_dropout per example the caption is the learned null condition
(classifier-free guidance). rope="2d" (Llama flavour of the AR) rotates by the tokenizer's grid.

Image tokens come from the frozen tokenizer (config.tokenizer_workdir) on the fly, or from a
pre-tokenised directory (config.data.tokens_dir) when its batches carry the captions. Captions:
batches with "caption_ids" / "caption_mask" (tokenised by the input pipeline) use them; the
built-in dataset's batches carry no strings, so each image is captioned from its label and
segmentation by the dataset's caption grammar (teachers/in_the_box_captions, as the teacher_clip
stage does), the 324 possible captions tokenised once by the text encoder's tokenizer.

evaluate(): AR: eval/perplexity (exp of the mean image-token NLL on the validation split, teacher-
forced with each image's own caption), eval/perplexity_null_caption (the same with the null
condition: the gap is what the captions tell the model); NAR: eval/masked_accuracy,
eval/masked_perplexity and eval/masked_perplexity_null_caption (masks of the training distribution
from a fixed key); both: a sample grid samples_<step>.png (real validation
images above images generated from their captions with config.sampling) with the captions in
samples_<step>.txt beside it. Images are decoded by the tokenizer itself (VQGAN / FSQ) or by the
pixel decoder of config.pixel_decoder_workdir; without either, the codes go to samples_<step>.npy.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from vqkd_jax.config import ConfigError
from vqkd_jax.proposal import nar as nar_lib
from vqkd_jax.proposal import sampling
from vqkd_jax.proposal import t2i as t2i_lib
from vqkd_jax.proposal.ar import ARTransformer
from vqkd_jax.proposal.nar import NARTransformer
from vqkd_jax.teachers.text_encoders import FrozenTextEncoder, load_text_encoder
from vqkd_jax.tokenizers.frozen import load_frozen_tokenizer
from vqkd_jax.train.ar import transformer_fields
from vqkd_jax.train.common import compute_dtype, variables
from vqkd_jax.train.objective import EvalContext, Objective

PROPOSALS = ("ar", "nar")


def build_model(model_cfg, *, codebook_size: int, num_image_tokens: int, text_length: int,
                precision: str = "float32", proposal: str = "ar", conditioning: str = "prefix",
                grid: tuple[int, int] | None = None) -> t2i_lib.TextConditioned:
  """The TextConditionedAR (proposal "ar") or TextConditionedNAR ("nar") of the conditioning
  ("prefix" | "cross_attention"); config.model holds the ARTransformer's or NARTransformer's
  fields (width, depth, num_heads, flavour, ...). `grid` (h, w): what rope="2d" rotates by."""
  if proposal not in PROPOSALS:
    raise ConfigError(f"config.proposal {proposal!r}: one of {', '.join(PROPOSALS)}")
  if conditioning not in t2i_lib.CONDITIONINGS:
    raise ConfigError(f"config.conditioning {conditioning!r}: one of "
                      f"{', '.join(t2i_lib.CONDITIONINGS)}")
  cross = conditioning == "cross_attention"
  seq_len = (1 if cross else text_length) + num_image_tokens
  dtype = compute_dtype(precision)
  if proposal == "ar":
    transformer = ARTransformer(vocab_size=codebook_size, seq_len=seq_len, cross_attention=cross,
                                **transformer_fields(model_cfg, num_image_tokens, grid),
                                dtype=dtype)
    return t2i_lib.TextConditionedAR(transformer, text_length, conditioning)
  transformer = NARTransformer(num_classes=0, codebook_size=codebook_size, seq_len=seq_len,
                               cross_attention=cross, **dict(model_cfg), dtype=dtype)
  return t2i_lib.TextConditionedNAR(transformer, text_length, conditioning)


def _build(config, tokenizer, encoder, precision) -> t2i_lib.TextConditioned:
  """build_model from a (saved) t2i config: configs without proposal / conditioning are AR
  prefix models."""
  h, w = tokenizer.grid(config["data"]["image_size"])
  return build_model(config["model"], codebook_size=tokenizer.num_codes, num_image_tokens=h * w,
                     text_length=encoder.context_length, precision=precision,
                     proposal=config.get("proposal", "ar"),
                     conditioning=config.get("conditioning", "prefix"), grid=(h, w))


def is_nar(model) -> bool:
  return isinstance(model, t2i_lib.TextConditionedNAR)


class ShapesCaptions:
  """Captions of the built-in dataset from each image's label and segmentation: `ids(batch,
  rng=None)` -> (ids int32 [B, L], mask bool [B, L]) in the text encoder's tokens (jittable; one
  caption per image, rng unused); `texts(batch)` -> the caption strings (host)."""

  def __init__(self, encoder: FrozenTextEncoder):
    from vqkd_jax.teachers import in_the_box_captions as captions

    self._captions = captions
    shape = captions.caption_table().shape[:4]
    self.strings = [captions.caption_from_attributes(*a) for a in np.ndindex(shape)]
    ids, mask = encoder.tokenize(self.strings)                 # caption_index order
    self._ids, self._mask = np.asarray(ids, np.int32), np.asarray(mask, bool)

  def _index(self, batch):
    return self._captions.caption_index(
        self._captions.attributes_from_annotation(batch["label"], batch["segmentation"]))

  def ids(self, batch, rng=None):
    del rng
    if "segmentation" not in batch:
      raise ValueError("the built-in dataset's captions come from each image's label and "
                       "segmentation; this batch has no segmentation (pre-tokenised data "
                       "without captions?)")
    index = self._index(batch)
    return jnp.asarray(self._ids)[index], jnp.asarray(self._mask)[index]

  def texts(self, batch) -> list[str]:
    return [self.strings[i] for i in np.asarray(self._index(batch))]


class BatchCaptions:
  """Captions that the input pipeline tokenised (data/coco.CaptionTokens): batch["caption_ids"],
  batch["caption_mask"], [B, L] or [B, K, L] (K captions per image: `ids` draws one per example
  with `rng`, the first without), and on the host batch["caption"] strings for the sample grid."""

  def ids(self, batch, rng=None):
    if "caption_ids" not in batch:
      raise ValueError("the t2i stage reads batch['caption_ids'] / ['caption_mask'] on datasets "
                       f"other than the built-in one; this batch has {sorted(batch)}")
    ids, mask = batch["caption_ids"].astype(jnp.int32), batch["caption_mask"].astype(bool)
    if ids.ndim == 3:
      pick = (jnp.zeros(ids.shape[:1], jnp.int32) if rng is None
              else jax.random.randint(rng, ids.shape[:1], 0, ids.shape[1]))
      ids = jnp.take_along_axis(ids, pick[:, None, None], axis=1)[:, 0]
      mask = jnp.take_along_axis(mask, pick[:, None, None], axis=1)[:, 0]
    return ids, mask

  def texts(self, batch) -> list[str]:
    return [str(c) for c in np.asarray(batch.get("caption", [""] * len(batch["caption_ids"])))]


def caption_source(config, encoder: FrozenTextEncoder):
  if config.data.name in ("shapes", "shapes_small") or config.data.synthetic:
    return ShapesCaptions(encoder)
  return BatchCaptions()


def make_objective(config, *, workdir: str, axis_name: str | None) -> Objective:
  tokenizer = load_frozen_tokenizer(config.tokenizer_workdir, config.precision)
  encoder = load_text_encoder(config.text_encoder, config.precision)
  h, w = tokenizer.grid(config.data.image_size)
  model = _build(config, tokenizer, encoder, config.precision)
  codebook_size = tokenizer.num_codes
  captions = caption_source(config, encoder)

  if config.data.get("tokens_dir"):
    from vqkd_jax.data.pretokenize import read_metadata
    meta = read_metadata(config.data.tokens_dir)
    if meta["num_codes"] != tokenizer.num_codes or tuple(meta["grid"]) != (h, w):
      raise ValueError(f"{config.data.tokens_dir} holds codes of {meta['num_codes']} on a "
                       f"{meta['grid']} grid; the tokenizer in {config.tokenizer_workdir} has "
                       f"{tokenizer.num_codes} on {[h, w]}")

  def image_tokens(tok_vars, batch):
    idx = batch["tokens"] if "tokens" in batch else tokenizer.encode(tok_vars, batch["image"])
    return idx.reshape(idx.shape[0], -1).astype(jnp.int32)

  def init(rng, batch):
    b = batch["image"].shape[0]
    length = encoder.context_length
    return model.init(rng, jnp.zeros((b, length, encoder.dim)), jnp.ones((b, length), bool),
                      jnp.zeros((b, h * w), jnp.int32))

  def loss(params, model_state, frozen, batch, rng, train):
    tokens = image_tokens(frozen["tokenizer"], batch)
    r_caption, r_drop, r_dropout = jax.random.split(rng, 3)
    ids, mask = captions.ids(batch, r_caption if train else None)
    states = encoder.encode(frozen["text_encoder"], ids, mask)
    drop = t2i_lib.caption_dropout(r_drop, tokens.shape[0],
                                   config.caption_dropout if train else 0.0)
    model_vars = variables(params, model_state)
    metrics = {"caption_dropout": jnp.mean(drop.astype(jnp.float32))}
    if is_nar(model):
      masked = nar_lib.random_mask(jax.random.fold_in(rng, 3), *tokens.shape)
      ids = nar_lib.masked_image_ids(tokens, masked, 0, codebook_size)
      logits = model.apply(model_vars, states, mask, ids, drop, train, rngs={"dropout": r_dropout})
      ce, nar_metrics = nar_lib.masked_token_metrics(logits, tokens, masked,
                                                     config.get("label_smoothing", 0.0))
      return ce, ({**metrics, **nar_metrics}, model_state)
    logits = model.apply(model_vars, states, mask, tokens, drop, train,
                         rngs={"dropout": r_dropout})
    ce = jnp.mean(t2i_lib.image_token_nll(logits, tokens))
    metrics.update(ce=ce, perplexity=jnp.exp(ce))
    return ce, (metrics, model_state)

  def evaluate(ctx: EvalContext) -> dict:
    model_vars = variables(ctx.params, ctx.model_state)
    validation = validation_masked_metrics if is_nar(model) else validation_perplexity
    out = validation(config, model, model_vars, encoder, captions, image_tokens, ctx.frozen)
    if config.sampling.num_samples:
      write_samples(config, model, model_vars, encoder, ctx.frozen["text_encoder"], captions,
                    tokenizer, (h, w), ctx)
    return out

  return Objective(init=init, loss=loss, evaluate=evaluate,
                   frozen={"tokenizer": tokenizer.variables, "text_encoder": encoder.variables})


def validation_perplexity(config, model, model_vars, encoder, captions, tokens_fn, frozen,
                          limit: int | None = None) -> dict:
  """{"perplexity": exp(mean image-token NLL) with each validation image's own caption,
  "perplexity_null_caption": the same from the null prefix}, teacher-forced.
  tokens_fn(tokenizer variables, batch) -> codes [B, N]; frozen: {"tokenizer", "text_encoder"}.
  AR models (a NAR's are validation_masked_metrics). `limit`: the split's first that many
  images."""
  from vqkd_jax.train.evaluate import map_split

  if is_nar(model):
    raise ValueError("validation_perplexity is teacher-forced AR perplexity; a t2i NAR model has "
                     "validation_masked_metrics")

  @jax.jit
  def fn(model_vars, frozen, batch):
    tokens = tokens_fn(frozen["tokenizer"], batch)
    ids, mask = captions.ids(batch)
    states = encoder.encode(frozen["text_encoder"], ids, mask)
    out = {"count": jnp.full(tokens.shape[:1], tokens.shape[1])}
    for name, drop in (("nll_sum", False), ("nll_null_sum", True)):
      logits = model.apply(model_vars, states, mask, tokens, jnp.full(tokens.shape[:1], drop))
      out[name] = t2i_lib.image_token_nll(logits, tokens).sum(-1)
    return out

  res = map_split(config, lambda batch: fn(model_vars, frozen, _numeric(batch)), limit=limit)
  count = res["count"].sum()
  return {"perplexity": float(np.exp(res["nll_sum"].sum() / count)),
          "perplexity_null_caption": float(np.exp(res["nll_null_sum"].sum() / count))}


def validation_masked_metrics(config, model, model_vars, encoder, captions, tokens_fn,
                              frozen) -> dict:
  """NAR: {"masked_accuracy", "masked_perplexity" (exp of the mean NLL over the masked
  positions), both with each validation image's own caption, "masked_perplexity_null_caption"
  (the same from the null condition)}; cosine-schedule masks from a fixed key per batch (the same
  on every evaluation). Arguments as validation_perplexity."""
  from vqkd_jax.train.evaluate import map_split

  codebook_size = model.transformer.codebook_size

  @jax.jit
  def fn(model_vars, frozen, batch):
    tokens = tokens_fn(frozen["tokenizer"], batch)
    ids, mask = captions.ids(batch)
    states = encoder.encode(frozen["text_encoder"], ids, mask)
    masked = nar_lib.random_mask(jax.random.PRNGKey(0), *tokens.shape)
    image_ids = nar_lib.masked_image_ids(tokens, masked, 0, codebook_size)
    logits_of = lambda drop: model.apply(model_vars, states, mask, image_ids,
                                         jnp.full(tokens.shape[:1], drop))
    out = nar_lib.masked_token_sums(logits_of(False), tokens, masked)
    out["nll_null_sum"] = nar_lib.masked_token_sums(logits_of(True), tokens, masked)["nll_sum"]
    return out

  res = map_split(config, lambda batch: fn(model_vars, frozen, _numeric(batch)))
  count = res["count"].sum()
  return {"masked_accuracy": float(res["correct"].sum() / count),
          "masked_perplexity": float(np.exp(res["nll_sum"].sum() / count)),
          "masked_perplexity_null_caption": float(np.exp(res["nll_null_sum"].sum() / count))}


def _numeric(batch: dict) -> dict:
  """The arrays of a host batch that jitted functions take (caption strings dropped)."""
  return {k: v for k, v in batch.items() if np.asarray(v).dtype.kind not in "OUS"}


@functools.partial(jax.jit, static_argnames=("model", "encode"))
def _sampling_inputs(model, encode, model_vars, text_vars, ids, mask):
  """The sampler's condition arguments (TextConditioned.sampling_inputs) of caption ids / mask;
  one compilation per model, text encoder and batch shape (the chunks of a long prompt list
  reuse it)."""
  states = encode(text_vars, ids, mask)
  return model.apply(model_vars, states, mask, method="sampling_inputs")


# The settings of the config's sampling group that each kind of model's sampler takes.
AR_SAMPLING = ("cfg_scale", "temperature", "top_k", "top_p")
NAR_SAMPLING = ("cfg_scale", "temperature", "steps", "cfg_schedule", "choice_temperature")


def sampling_settings(model, sampling_cfg) -> dict:
  """The entries of a sampling group (config.sampling) that sample_images takes for `model`."""
  keys = NAR_SAMPLING if is_nar(model) else AR_SAMPLING
  return {k: sampling_cfg[k] for k in keys if k in sampling_cfg}


def sample_images(model, model_vars, encoder: FrozenTextEncoder, text_vars, ids, mask, *,
                  rng: jax.Array, cfg_scale: float | None = 1.75, temperature: float = 1.0,
                  top_k: int | None = 0, top_p: float | None = 1.0, example_offset: int = 0,
                  steps: int = 8, cfg_schedule: str = "constant",
                  choice_temperature: float = 4.5) -> jax.Array:
  """Image codes int32 [B, N] for caption ids [B, L] / mask [B, L] (the encoder's tokens), with
  classifier-free guidance against the learned null condition (cfg_scale None or 1: none). Each
  sample depends on the seed and its index (example_offset + row) only.
  AR: top_k, top_p (KV-cached, one token per step). NAR: steps, cfg_schedule, choice_temperature
  (parallel decoding; top_k / top_p other than off raise ValueError).
  ids / mask whose rows are split over devices by a NamedSharding (api.Generator with several
  devices): the condition's rows are split the same way, and each device samples its own rows
  (`sampling.batch_split`; NAR: XLA's partitioner), with the same tokens as on one device."""
  ids, mask = jnp.asarray(ids, jnp.int32), jnp.asarray(mask, bool)
  inputs = _sampling_inputs(model, encoder.encode, model_vars, text_vars, ids, mask)
  if sampling.batch_split(ids) is not None:   # the samplers read the split from the prefix's rows
    rows = NamedSharding(ids.sharding.mesh, P(ids.sharding.spec[0]))
    inputs = {**inputs, "prefix": jax.device_put(inputs["prefix"], rows)}
  params = model_vars["params"]["transformer"]
  if is_nar(model):
    if top_k or (top_p is not None and top_p != 1.0):
      raise ValueError("top_k and top_p filter AR sampling; a NAR t2i model decodes in parallel "
                       "steps (steps, temperature, choice_temperature)")
    return nar_lib.sample_from_prefix(
        model.transformer, params, **inputs, rng=rng, steps=steps, cfg_scale=cfg_scale,
        cfg_schedule=cfg_schedule, temperature=temperature,
        choice_temperature=choice_temperature, example_offset=example_offset)
  return sampling.sample_from_prefix(
      model.transformer, params, **inputs, num_image_tokens=model.num_image_tokens,
      codebook_size=model.transformer.vocab_size, rng=rng, cfg_scale=cfg_scale,
      temperature=temperature, top_k=top_k, top_p=top_p, example_offset=example_offset)


def image_decoder(tokenizer, decoder_workdir: str | None, precision: str = "float32"):
  """codes [B, h, w] -> uint8 images, or None: the tokenizer's own decoder (VQGAN / FSQ), else the
  pixel decoder of decoder_workdir when given."""
  if tokenizer.decode is not None:
    return jax.jit(lambda idx: tokenizer.decode(tokenizer.variables, idx))
  if decoder_workdir:
    from vqkd_jax.train import pixel_decoder as decoder_stage
    from vqkd_jax.train.common import to_uint8

    decoder, decoder_vars = decoder_stage.load_decoder(decoder_workdir, precision)
    return jax.jit(lambda idx: to_uint8(decoder.apply(
        decoder_vars, tokenizer.lookup(tokenizer.variables, idx))))
  return None


def write_samples(config, model, model_vars, encoder, text_vars, captions, tokenizer, grid, ctx):
  """Samples from the first config.sampling.num_samples validation captions: samples_<step>.png
  (real images above generated ones, 8 per row) or samples_<step>.npy (codes, when nothing decodes
  them), and samples_<step>.txt (one caption per line, grid order)."""
  from vqkd_jax.evaluation.images import save_grid, side_by_side
  from vqkd_jax.train import inputs as inputs_lib

  n = int(config.sampling.num_samples)
  batch = next(iter(inputs_lib.make_eval_input(config, batch_size=n * jax.process_count())))
  keep = np.asarray(batch.pop("mask"))
  batch = {k: np.asarray(v)[keep][:n] for k, v in batch.items()}
  texts = captions.texts(batch)
  ids, mask = jax.jit(captions.ids)(_numeric(batch))
  codes = sample_images(model, model_vars, encoder, text_vars, ids, mask,
                        rng=jax.random.PRNGKey(config.seed),
                        **sampling_settings(model, config.sampling))
  codes = np.asarray(codes).reshape(-1, *grid)
  if jax.process_index() != 0:
    return
  base = os.path.join(ctx.workdir, f"samples_{ctx.step}")
  with open(base + ".txt", "w") as f:
    f.write("".join(f"{t}\n" for t in texts))
  decode = image_decoder(tokenizer, config.get("pixel_decoder_workdir"), config.precision)
  if decode is None:
    np.save(base + ".npy", codes)
    return
  images = np.asarray(decode(jnp.asarray(codes)))
  real = batch["image"] if batch["image"].shape == images.shape else np.zeros_like(images)
  save_grid(side_by_side(real, images, per_row=8), base + ".png", ncols=min(8, len(images)))


def load_t2i(workdir: str, precision: str = "float32", tokenizer=None, text_encoder=None):
  """(model, variables, info) of a trained t2i stage (the model a TextConditionedAR or
  TextConditionedNAR, as its config's proposal and conditioning say); info: proposal ("ar" |
  "nar"), codebook_size, grid, tokenizer (the FrozenTokenizer), text_encoder (the
  FrozenTextEncoder), tokenizer_workdir, pixel_decoder_workdir and the config's sampling group.
  Sample with `sample_images(model, variables, info["text_encoder"],
  info["text_encoder"].variables, *info["text_encoder"].tokenize(captions), rng=...)`.

  tokenizer: a FrozenTokenizer or work directory to use instead of the config's tokenizer_workdir.
  text_encoder: a FrozenTextEncoder, or the place of the config's text encoder to use instead of
  the saved one (in_the_box: a teacher_clip work directory; hf_clip: a CLIP folder)."""
  import ml_collections

  from vqkd_jax.train.loop import load_trained

  trained = load_trained(workdir)
  cfg = trained["config"]
  if tokenizer is None or isinstance(tokenizer, str):
    tokenizer = load_frozen_tokenizer(tokenizer or cfg["tokenizer_workdir"], precision)
  if text_encoder is None or isinstance(text_encoder, str):
    te_cfg = ml_collections.ConfigDict(cfg["text_encoder"])
    if text_encoder:
      te_cfg["workdir" if te_cfg.kind == "in_the_box" else "path"] = text_encoder
    text_encoder = load_text_encoder(te_cfg, precision)
  encoder = text_encoder
  h, w = tokenizer.grid(cfg["data"]["image_size"])
  model = _build(cfg, tokenizer, encoder, precision)
  info = {"proposal": "nar" if is_nar(model) else "ar", "codebook_size": tokenizer.num_codes,
          "grid": (h, w), "tokenizer": tokenizer, "text_encoder": encoder, "tokenizer_workdir": cfg["tokenizer_workdir"],
          "pixel_decoder_workdir": cfg.get("pixel_decoder_workdir") or "",
          "sampling": dict(cfg.get("sampling") or {})}
  return model, variables(trained["params"], trained["model_state"]), info
