"""Stage: the in-the-box CLIP-style teacher (teachers/in_the_box_clip.py) on the built-in dataset.

Per step: a random horizontal flip of each image (and of its segmentation), each image's caption
from its label and segmentation (in_the_box_captions.attributes_from_annotation: the dataset's
caption grammar, true after the flip; it equals the stored caption for 94% of the validation
images, 98% of the places), and CLIP's symmetric InfoNCE loss with a learned temperature
(in_the_box_clip.contrastive_loss) over the batch's images and captions, where images of identical
captions count as matches of each other's captions (with 324 possible captions a batch of 64 holds
many repeats). Under the "pmap" strategy the negatives are the device's own examples; "dp" and the
other jit strategies see the global batch.

Places are the slow part: with ViT's position-embedding init (std 0.02) the image tower had not
learnt them after 500 steps (zero-shot place accuracy 0.12, chance 0.11; 0.47 after 1,500 steps):
the positions are a small part of each token next to the stem's features, and an image's in-batch
negatives rarely differ from it by the place alone. The demo starts the position embeddings at
std 0.2 (model.pos_init_std): places at 0.76 after 500 steps.

evaluate(): eval/token_similarity and eval/probe_* (train/teacher_probe.py) of the patch tokens,
and zero-shot caption retrieval over the 324 captions of the grammar: eval/zero_shot_class_accuracy
(colour and shape of the best caption right), eval/zero_shot_cell_accuracy (its place right).

config.model: image_size, patch_size, width, depth, num_heads, embed_dim, text_width, text_depth,
text_heads, context_length, conv_stem, init_temperature, pos_init_std.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vqkd_jax.teachers import in_the_box_captions as captions
from vqkd_jax.teachers.in_the_box_clip import ContrastiveImageText, contrastive_loss, same_caption
from vqkd_jax.train.common import compute_dtype, to_unit_range, variables
from vqkd_jax.train.objective import EvalContext, Objective


def build_model(model_cfg, precision: str = "float32") -> ContrastiveImageText:
  return ContrastiveImageText(**dict(model_cfg), dtype=compute_dtype(precision))


def tokens_fn(model: ContrastiveImageText, variables_):
  """uint8 images [B, H, W, 3] -> teacher tokens [B, N, embed_dim] (final norm + projection)."""
  return lambda images: model.apply(variables_, to_unit_range(images),
                                    method=ContrastiveImageText.patch_tokens)


def frozen_teacher(trained: dict, precision: str = "float32"):
  """(variables, apply_tokens(variables, uint8 images) -> [B, N, embed_dim], embed_dim) of a
  finished stage (loop.load_trained's dict); the variables hold the image tower (and the
  temperature) only."""
  model = build_model(trained["config"]["model"], precision)
  p = trained["params"]
  teacher_vars = {"params": {k: p[k] for k in ("visual", "visual_proj", "logit_scale")}}
  return teacher_vars, lambda v, images: tokens_fn(model, v)(images), model.embed_dim


def load_clip(workdir: str, precision: str = "float32") -> tuple[ContrastiveImageText, dict]:
  """(model, variables) of a finished teacher_clip stage. Text embeddings of captions:
  model.apply(variables, captions.tokenize(texts), method=ContrastiveImageText.encode_text)."""
  from vqkd_jax.train.loop import load_trained

  trained = load_trained(workdir)
  if trained["config"].get("stage") != "teacher_clip":
    raise ValueError(f"{workdir} holds stage {trained['config'].get('stage')!r}, not teacher_clip")
  return (build_model(trained["config"]["model"], precision),
          variables(trained["params"], trained["model_state"]))


def make_objective(config, *, workdir: str, axis_name: str | None) -> Objective:
  model = build_model(config.model, config.precision)
  table = captions.caption_table(config.model.context_length)

  def init(rng, batch):
    images = to_unit_range(batch["image"])
    ids = jnp.zeros((images.shape[0], config.model.context_length), jnp.int32)
    return model.init(rng, images, ids)

  all_ids = jnp.asarray(table.reshape(-1, table.shape[-1]))  # [324, L], caption_index order

  def loss(params, model_state, frozen, batch, rng, train):
    images, seg = to_unit_range(batch["image"]), batch["segmentation"]
    flip = jax.random.bernoulli(rng, 0.5, (images.shape[0],))
    images = jnp.where(flip[:, None, None, None], images[:, :, ::-1], images)
    seg = jnp.where(flip[:, None, None], seg[:, :, ::-1], seg)
    ids = all_ids[captions.caption_index(captions.attributes_from_annotation(batch["label"], seg))]
    out = model.apply(variables(params, model_state), images, ids)
    total, metrics = contrastive_loss(out["image_embed"], out["text_embed"], out["logit_scale"],
                                      same_caption(ids))
    metrics = dict(metrics, infonce=total, temperature=jnp.exp(-out["logit_scale"]))
    return total, (metrics, model_state)

  def evaluate(ctx: EvalContext) -> dict:
    from vqkd_jax.train.evaluate import map_split
    from vqkd_jax.train.teacher_probe import evaluate_tokens

    v = variables(ctx.params, ctx.model_state)
    out = evaluate_tokens(config, tokens_fn(model, v))
    text = model.apply(v, all_ids, method=ContrastiveImageText.encode_text)
    text = text / jnp.linalg.norm(text, axis=-1, keepdims=True)
    n_colours, n_cells, n_sizes = table.shape[1:4]

    @jax.jit
    def fn(batch):
      image = model.apply(v, to_unit_range(batch["image"]),
                          method=ContrastiveImageText.encode_image)
      best = jnp.argmax(image @ text.T, axis=-1)
      truth = captions.attributes_from_annotation(batch["label"], batch["segmentation"])
      shape_colour, cell = best // (n_cells * n_sizes), (best // n_sizes) % n_cells
      return {"class": shape_colour == truth["shape"] * n_colours + truth["colour"],
              "cell": cell == truth["cell"]}

    res = map_split(config, fn)
    out["zero_shot_class_accuracy"] = float(np.mean(res["class"]))
    out["zero_shot_cell_accuracy"] = float(np.mean(res["cell"]))
    return out

  return Objective(init=init, loss=loss, evaluate=evaluate)
