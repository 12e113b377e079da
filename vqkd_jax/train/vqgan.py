"""Pixel-reconstruction tokenizers: VQGAN (upstream §3.1) and FSQ (§3.3) on the VQGAN trunk, trained
with L1 + perceptual + PatchGAN hinge losses and the adaptive generator weight (train/gan.py), the
discriminator by its own optimizer (config.disc_optimizer).

Variables: params {"tokenizer", "discriminator"}; model state {"batch_stats": {"discriminator"},
"gan": {"step"}} (+ {"codebook": {"tokenizer"}} for CVQ-VAE anchors). config.model holds
tokenizers.vqgan.VQGANTokenizer's fields; config.loss reconstruction_config; config.gan gan_config.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vqkd_jax import quantizers
from vqkd_jax.nn.conv import conv
from vqkd_jax.tokenizers.vqgan import VQGANTokenizer
from vqkd_jax.train import gan as gan_lib
from vqkd_jax.train.common import compute_dtype, to_uint8, to_unit_range
from vqkd_jax.train.objective import EvalContext, Objective
from vqkd_jax.train.reconstruction import ReconstructionLoss


def build_model(model_cfg, precision: str = "float32", axis_name=None) -> VQGANTokenizer:
  cfg = dict(model_cfg)
  for k in ("levels", "encoder_mults", "encoder_attn", "decoder_mults", "decoder_attn"):
    if k in cfg:
      cfg[k] = tuple(cfg[k])
  return VQGANTokenizer(**cfg, dtype=compute_dtype(precision), axis_name=axis_name)


def tokenizer_variables(params, model_state) -> dict:
  """The tokenizer's own variables out of the stage's (params and model-state collections are
  keyed by model: "tokenizer" / "discriminator")."""
  out = {"params": params["tokenizer"]}
  for col, tree in (model_state or {}).items():
    if isinstance(tree, dict) and "tokenizer" in tree:
      out[col] = tree["tokenizer"]
  return out


def last_layer(model: VQGANTokenizer, features: jax.Array, bias: jax.Array):
  """kernel -> images of the decoder's last conv on fixed `features` (for the adaptive weight)."""
  layer = conv(3, 3, dtype=model.dtype)
  return lambda kernel: layer.apply({"params": {"kernel": kernel, "bias": bias}},
                                    features).astype(jnp.float32)


def gan_step_loss(model, disc, rec_loss, gan_cfg, *, params, model_state, frozen, images, rng,
                  train, out, new_tok_state):
  """Shared by the GAN-trained decoders: reconstruction + adversarial terms of `out` (the
  generator's output dict with recon and decoder_features) -> (total without the quantizer's
  loss, new model state, metrics). `last kernel` = params[...]["decoder"]["conv_out"]."""
  target = to_unit_range(images)
  rec_fn = lambda r: rec_loss(frozen["perceptual"], r, target, rng, train)[0]
  rec, rec_metrics = rec_loss(frozen["perceptual"], out["recon"], target, rng, train)
  dec_params = out["decoder_params"]
  step = model_state["gan"]["step"]
  g_term, d_term, disc_state, gan_metrics = gan_lib.adversarial_terms(
      disc, gan_cfg, params["discriminator"], {"batch_stats": model_state["batch_stats"][
          "discriminator"]}, recon=out["recon"], real=target, step=step, rec_loss_fn=rec_fn,
      apply_last=last_layer(model, jax.lax.stop_gradient(out["decoder_features"]),
                            jax.lax.stop_gradient(dec_params["conv_out"]["bias"])),
      last_kernel=jax.lax.stop_gradient(dec_params["conv_out"]["kernel"]))
  new_state = dict(model_state)
  new_state.update(new_tok_state)
  new_state["batch_stats"] = {"discriminator": disc_state["batch_stats"]}
  new_state["gan"] = {"step": step + 1}
  metrics = dict(rec_metrics, reconstruction_loss=rec, **gan_metrics)
  return rec + g_term + d_term, new_state, metrics


def init_gan_variables(tok_vars: dict, disc, rng, images) -> dict:
  """Stage variables from the generator's variables and a fresh discriminator."""
  d_vars = gan_lib.init_discriminator(disc, rng, jnp.zeros(images.shape, jnp.float32))
  out = {"params": {"tokenizer": tok_vars["params"], "discriminator": d_vars["params"]},
         "batch_stats": {"discriminator": d_vars["batch_stats"]},
         "gan": {"step": jnp.zeros((), jnp.int32)}}
  for col, tree in tok_vars.items():
    if col != "params":
      out[col] = {"tokenizer": tree}
  return out


def make_objective(config, *, workdir: str, axis_name: str | None) -> Objective:
  model = build_model(config.model, config.precision, axis_name)
  disc = gan_lib.build_discriminator(config.gan, compute_dtype(config.precision), axis_name)
  rec_loss = ReconstructionLoss(config.loss, config.precision)

  def init(rng, batch):
    x = to_unit_range(batch["image"])
    r_tok, r_disc = jax.random.split(rng)
    return init_gan_variables(model.init(r_tok, x, train=False), disc, r_disc, x)

  def loss(params, model_state, frozen, batch, rng, train):
    tok_vars = tokenizer_variables(params, model_state)
    mutable = [c for c in tok_vars if c != "params"]
    out, tok_state = model.apply(tok_vars, to_unit_range(batch["image"]), train=train,
                                 mutable=mutable)
    out = dict(out, decoder_params=params["tokenizer"]["decoder"])
    total, new_state, metrics = gan_step_loss(
        model, disc, rec_loss, config.gan, params=params, model_state=model_state, frozen=frozen,
        images=batch["image"], rng=rng, train=train, out=out,
        new_tok_state={c: {"tokenizer": v} for c, v in tok_state.items()})
    metrics.update(quantizer_loss=out["quantizer_loss"],
                   codebook_usage=quantizers.codebook_usage(out["usage_counts"]),
                   code_perplexity=quantizers.code_perplexity(out["usage_counts"]))
    return total + out["quantizer_loss"], (metrics, new_state)

  def evaluate(ctx: EvalContext) -> dict:
    return evaluate_reconstruction(config, model, tokenizer_variables(ctx.params, ctx.model_state),
                                   ctx, rec_loss, model.vocab_size)

  return Objective(init=init, loss=loss, frozen={"perceptual": rec_loss.variables},
                   evaluate=evaluate,
                   after_update=quantizers.apply_anchors if config.model.get("anchors") else None)


def evaluate_reconstruction(config, model, tok_vars, ctx: EvalContext, rec_loss, num_codes) -> dict:
  """Validation PSNR, perceptual distance, codebook usage and perplexity; a reconstruction grid."""
  from vqkd_jax.evaluation import metrics as metrics_lib
  from vqkd_jax.evaluation.images import save_grid
  from vqkd_jax.train.evaluate import map_split

  @jax.jit
  def fn(batch):
    out = model.apply(tok_vars, to_unit_range(batch["image"]), train=False)
    res = {"recon": to_uint8(out["recon"]), "image": batch["image"],
           "indices": out["indices"].reshape(out["indices"].shape[0], -1)}
    if rec_loss.perceptual is not None:
      res["perceptual"] = rec_loss.perceptual.distance(ctx.frozen["perceptual"], out["recon"],
                                                       to_unit_range(batch["image"]))
    return res

  res = map_split(config, fn)
  grid = np.concatenate([res["image"][:32], res["recon"][:32]])
  save_grid(grid, f"{ctx.workdir}/reconstructions_{ctx.step}.png", ncols=16)
  counts = np.bincount(res["indices"].ravel(), minlength=num_codes)
  out = {"psnr": metrics_lib.psnr(res["image"], res["recon"]),
         "codebook_usage": metrics_lib.codebook_usage(counts),
         "code_perplexity": metrics_lib.code_perplexity(counts)}
  if "perceptual" in res:
    out[f"perceptual_{config.loss.perceptual.kind}"] = float(np.mean(res["perceptual"]))
  return out


def frozen_tokenizer(trained: dict, precision: str = "float32"):
  """The trained VQGAN / FSQ tokenizer as a FrozenTokenizer with its own decoder."""
  from vqkd_jax.tokenizers.frozen import FrozenTokenizer

  cfg = trained["config"]
  model = build_model(cfg["model"], precision)
  tok_vars = tokenizer_variables(trained["params"], trained["model_state"])
  tok_vars = {k: v for k, v in tok_vars.items() if k in ("params", "codebook")}
  return FrozenTokenizer(
      stage="vqgan", num_codes=model.vocab_size, code_dim=model.codes_dim, variables=tok_vars,
      encode=lambda v, x: model.apply(v, to_unit_range(x), method="encode"),
      lookup=lambda v, idx: model.apply(v, idx, method="lookup"),
      decode=lambda v, idx: to_uint8(model.apply(v, idx, method="decode")),
      image_size=cfg["data"]["image_size"])
