"""Stage c: a pixel decoder trained on a frozen tokenizer's codes (upstream §4, LlamaGen recipe).

The tokenizer (any tokenizer stage: VQ-KD or Cluster codes) is frozen: images -> code indices ->
code vectors -> decoder -> pixels. Loss (config.loss, train/reconstruction.py): MSE + perceptual
(+ L1 if set); with a `gan` group, + weight * -mean(D(x_hat)) from step gan.start and the
discriminator's hinge loss (train/gan.py; upstream: PatchGAN depth 3, weights 0.5 / 0.5, no adaptive
weight, start 20k), the discriminator trained by config.disc_optimizer.

Variables: params {"decoder"[, "discriminator"]}; model state {"batch_stats": {"discriminator"},
"gan": {"step"}} with a GAN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vqkd_jax.tokenizers.frozen import load_frozen_tokenizer
from vqkd_jax.tokenizers.pixel_decoder import PixelDecoder
from vqkd_jax.train import gan as gan_lib
from vqkd_jax.train.common import compute_dtype, to_uint8, to_unit_range
from vqkd_jax.train.objective import EvalContext, Objective
from vqkd_jax.train.reconstruction import ReconstructionLoss


def build_model(model_cfg, precision: str = "float32") -> PixelDecoder:
  cfg = dict(model_cfg)
  for k in ("channel_mults", "attn_stages"):
    if k in cfg:
      cfg[k] = tuple(cfg[k])
  return PixelDecoder(**cfg, dtype=compute_dtype(precision))


def make_objective(config, *, workdir: str, axis_name: str | None) -> Objective:
  from vqkd_jax.train.vqgan import gan_step_loss, init_gan_variables

  model = build_model(config.model, config.precision)
  tokenizer = load_frozen_tokenizer(config.tokenizer_workdir, config.precision)
  if tokenizer.code_dim != config.model.code_dim:
    raise ValueError(f"the tokenizer in {config.tokenizer_workdir} has {tokenizer.code_dim}-d codes "
                     f"but model.code_dim is {config.model.code_dim}: set "
                     f"--config.model.code_dim={tokenizer.code_dim}")
  rec_loss = ReconstructionLoss(config.loss, config.precision)
  use_gan = config.get("gan") is not None
  disc = (gan_lib.build_discriminator(config.gan, compute_dtype(config.precision), axis_name)
          if use_gan else None)

  def codes(tok_vars, images_uint8):
    return jax.lax.stop_gradient(tokenizer.lookup(tok_vars, tokenizer.encode(tok_vars, images_uint8)))

  def init(rng, batch):
    z = jax.eval_shape(codes, tokenizer.variables, batch["image"])
    r_dec, r_disc = jax.random.split(rng)
    dec_vars = model.init(r_dec, jnp.zeros(z.shape, jnp.float32))
    if not use_gan:
      return {"params": {"decoder": dec_vars["params"]}}
    out = init_gan_variables({"params": dec_vars["params"]}, disc, r_disc,
                             to_unit_range(batch["image"]))
    out["params"]["decoder"] = out["params"].pop("tokenizer")
    return out

  def loss(params, model_state, frozen, batch, rng, train):
    z = codes(frozen["tokenizer"], batch["image"])
    recon, features = model.apply({"params": params["decoder"]}, z, return_features=True)
    if not use_gan:
      total, metrics = rec_loss(frozen["perceptual"], recon, to_unit_range(batch["image"]), rng,
                                train)
      return total, (metrics, model_state)
    out = {"recon": recon, "decoder_features": features, "decoder_params": params["decoder"]}
    total, new_state, metrics = gan_step_loss(
        model, disc, rec_loss, config.gan, params=params, model_state=model_state, frozen=frozen,
        images=batch["image"], rng=rng, train=train, out=out, new_tok_state={})
    return total, (metrics, new_state)

  def evaluate(ctx: EvalContext) -> dict:
    from vqkd_jax.evaluation import metrics as metrics_lib
    from vqkd_jax.evaluation.images import save_grid
    from vqkd_jax.train.evaluate import map_split

    @jax.jit
    def fn(batch):
      recon = model.apply({"params": ctx.params["decoder"]}, codes(ctx.frozen["tokenizer"],
                                                                  batch["image"]))
      res = {"recon": to_uint8(recon), "image": batch["image"]}
      if rec_loss.perceptual is not None:
        res["perceptual"] = rec_loss.perceptual.distance(ctx.frozen["perceptual"], recon,
                                                         to_unit_range(batch["image"]))
      return res

    res = map_split(config, fn)
    grid = np.concatenate([res["image"][:32], res["recon"][:32]])
    save_grid(grid, f"{ctx.workdir}/reconstructions_{ctx.step}.png", ncols=16)
    out = {"psnr": metrics_lib.psnr(res["image"], res["recon"])}
    if "perceptual" in res:
      out[f"perceptual_{config.loss.perceptual.kind}"] = float(np.mean(res["perceptual"]))
    return out

  return Objective(init=init, loss=loss, evaluate=evaluate,
                   frozen={"tokenizer": tokenizer.variables, "perceptual": rec_loss.variables})


def load_decoder(workdir: str, precision: str = "float32"):
  """(module, variables) of a trained pixel decoder stage."""
  from vqkd_jax.train.loop import load_trained

  trained = load_trained(workdir)
  return (build_model(trained["config"]["model"], precision),
          {"params": trained["params"]["decoder"]})
