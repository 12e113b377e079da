"""Frozen teachers for distillation: one interface whatever the source of the weights.

config.teacher fields: kind ("in_the_box_vit": the supervised ViT trained by
`configs/demo/teacher.py`; "in_the_box_mae", "in_the_box_clip", "in_the_box_dino": the
self-supervised and caption teachers of `configs/demo/teacher_mae.py`, `teacher_clip.py`,
`teacher_dino.py`), workdir (that stage's work directory). Hugging Face ports plug in here as
further kinds.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax


@dataclasses.dataclass
class FrozenTeacher:
  """A frozen image-understanding model.

  `tokens(variables, images)` maps uint8 images [B, H, W, 3] to last-layer patch tokens [B, N, dim]
  (after the final norm, CLS dropped), with the teacher's own preprocessing.
  """
  variables: Any
  apply_tokens: Callable[[Any, jax.Array], jax.Array]
  dim: int

  def tokens(self, variables, images_uint8: jax.Array) -> jax.Array:
    return self.apply_tokens(variables, images_uint8)


def load_teacher(teacher_cfg, precision: str = "float32") -> FrozenTeacher:
  """Builds the teacher named by `teacher_cfg.kind` and loads its weights."""
  if teacher_cfg.kind == "in_the_box_vit":
    from vqkd_jax.train import teacher as teacher_stage
    from vqkd_jax.train.common import to_unit_range
    from vqkd_jax.train.loop import load_trained

    trained = load_trained(teacher_cfg.workdir)
    model = teacher_stage.build_model(trained["config"]["model"], precision)
    variables = {"params": trained["params"], **trained["model_state"]}

    def apply_tokens(variables, images):
      return model.apply(variables, to_unit_range(images), train=False)["tokens"]

    return FrozenTeacher(variables=variables, apply_tokens=apply_tokens, dim=model.width)
  if teacher_cfg.kind in ("in_the_box_mae", "in_the_box_clip", "in_the_box_dino"):
    # Trained by the teacher_mae / teacher_clip / teacher_dino stage in teacher_cfg.workdir.
    import importlib

    from vqkd_jax.train.loop import load_trained

    stage = "teacher_" + teacher_cfg.kind[len("in_the_box_"):]
    trained = load_trained(teacher_cfg.workdir)
    if trained["config"].get("stage") != stage:
      raise ValueError(f"teacher kind {teacher_cfg.kind!r} needs a {stage} stage's workdir; "
                       f"{teacher_cfg.workdir} holds stage {trained['config'].get('stage')!r}")
    variables, apply_tokens, dim = importlib.import_module(
        f"vqkd_jax.train.{stage}").frozen_teacher(trained, precision)
    return FrozenTeacher(variables=variables, apply_tokens=apply_tokens, dim=dim)
  if teacher_cfg.kind in ("clip", "vit", "dino", "mae", "dinov2", "siglip"):
    # Hugging Face checkpoints (teachers/hf_teachers.py). Fields: path (folder or hub id),
    # image_size (what the teacher sees; default the checkpoint's), with_projection (CLIP).
    from vqkd_jax.teachers.hf_teachers import load_hf_teacher
    from vqkd_jax.train.common import compute_dtype

    hf = load_hf_teacher(teacher_cfg.kind, teacher_cfg.path, teacher_cfg.get("image_size"),
                         teacher_cfg.get("with_projection", True), compute_dtype(precision))
    return FrozenTeacher(variables={"params": hf.params},
                         apply_tokens=lambda v, images: hf.tokens(v["params"], images), dim=hf.dim)
  if teacher_cfg.kind == "random_vit":
    return random_vit_teacher(teacher_cfg, precision)
  raise ValueError(f"unknown teacher kind {teacher_cfg.kind!r}; known: in_the_box_vit, "
                   "in_the_box_mae, in_the_box_clip, in_the_box_dino, random_vit, clip, vit, dino, "
                   "mae, dinov2, siglip")


def random_vit_teacher(teacher_cfg, precision: str = "float32") -> FrozenTeacher:
  """kind "random_vit": a ViT of the configured size with random weights, no checkpoint (benchmarks
  and tests at ImageNet size without downloads). Fields: patch_size, width, depth, num_heads,
  image_size, out_dim (a final projection as CLIP's; 0 = none). Same FLOPs as the real teacher."""
  import flax.linen as nn
  import jax.numpy as jnp

  from vqkd_jax.nn.vit import ViTEncoder, layer_norm
  from vqkd_jax.train.common import compute_dtype, to_unit_range

  dtype = compute_dtype(precision)

  class RandomViT(nn.Module):
    @nn.compact
    def __call__(self, x):
      t = ViTEncoder(teacher_cfg.patch_size, teacher_cfg.width, teacher_cfg.depth,
                     teacher_cfg.num_heads, image_size=teacher_cfg.image_size, dtype=dtype,
                     approximate_gelu=teacher_cfg.get("approximate_gelu", False),
                     frozen=True, name="encoder")(x)[:, 1:]
      t = layer_norm("norm", dtype)(t)
      if teacher_cfg.out_dim:
        t = nn.Dense(teacher_cfg.out_dim, use_bias=False, dtype=dtype, name="proj")(t)
      return t.astype(jnp.float32)

  model = RandomViT()
  size = teacher_cfg.image_size
  with jax.default_device(jax.local_devices(backend="cpu")[0]):  # See loop.init_sharded.
    variables = jax.device_get(nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0),
                                                            jnp.zeros((1, size, size, 3)))))
  return FrozenTeacher(variables=variables,
                       apply_tokens=lambda v, images: model.apply(v, to_unit_range(images)),
                       dim=teacher_cfg.out_dim or teacher_cfg.width)
