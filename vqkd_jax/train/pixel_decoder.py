"""Stage c: a pixel decoder trained on the frozen tokenizer's codes (upstream §4, pixel loss only).

The tokenizer (any tokenizer stage: VQ-KD or Cluster codes) is frozen: images -> code indices -> l2-normalised code vectors ->
decoder -> pixels, with loss = MSE + L1 on [-1, 1] pixels. (LPIPS and the PatchGAN of the full recipe
come with the tokenizer issue.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vqkd_jax.tokenizers.frozen import load_frozen_tokenizer
from vqkd_jax.tokenizers.pixel_decoder import PixelDecoder
from vqkd_jax.train.common import compute_dtype, to_uint8, to_unit_range, variables
from vqkd_jax.train.objective import EvalContext, Objective


def build_model(model_cfg, precision: str = "float32") -> PixelDecoder:
  return PixelDecoder(**dict(model_cfg), dtype=compute_dtype(precision))


def make_objective(config, *, workdir: str, axis_name: str | None) -> Objective:
  model = build_model(config.model, config.precision)
  tokenizer = load_frozen_tokenizer(config.tokenizer_workdir, config.precision)

  def codes(tok_vars, images_uint8):
    indices = tokenizer.encode(tok_vars, images_uint8)
    return indices, tokenizer.lookup(tok_vars, indices)

  def init(rng, batch):
    _, z = jax.eval_shape(codes, tokenizer.variables, batch["image"])
    return model.init(rng, jnp.zeros(z.shape, jnp.float32))

  def loss(params, model_state, frozen, batch, rng, train):
    _, z = codes(frozen["tokenizer"], batch["image"])
    recon = model.apply(variables(params, model_state), jax.lax.stop_gradient(z)).astype(jnp.float32)
    target = to_unit_range(batch["image"])
    mse = jnp.mean((recon - target) ** 2)
    l1 = jnp.mean(jnp.abs(recon - target))
    return mse + l1, ({"mse": mse, "l1": l1}, model_state)

  def evaluate(ctx: EvalContext) -> dict:
    from vqkd_jax.evaluation import metrics as metrics_lib
    from vqkd_jax.evaluation.images import save_grid
    from vqkd_jax.train.evaluate import map_split

    @jax.jit
    def fn(batch):
      _, z = codes(ctx.frozen["tokenizer"], batch["image"])
      return {"recon": to_uint8(model.apply(variables(ctx.params, ctx.model_state), z)),
              "image": batch["image"]}

    res = map_split(config, fn)
    grid = np.concatenate([res["image"][:32], res["recon"][:32]])
    save_grid(grid, f"{ctx.workdir}/reconstructions_{ctx.step}.png", ncols=16)
    return {"psnr": metrics_lib.psnr(res["image"], res["recon"])}

  return Objective(init=init, loss=loss, frozen={"tokenizer": tokenizer.variables}, evaluate=evaluate)


def load_decoder(workdir: str, precision: str = "float32"):
  """(module, variables) of a trained pixel decoder stage."""
  from vqkd_jax.train.loop import load_trained

  trained = load_trained(workdir)
  return build_model(trained["config"]["model"], precision), variables(trained["params"],
                                                                         trained["model_state"])
