"""Frozen teachers for distillation: one interface whatever the source of the weights.

config.teacher fields: kind ("in_the_box_vit": the supervised ViT trained by `configs/demo/teacher.py`),
workdir (that stage's work directory). Hugging Face ports plug in here as further kinds.
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
  raise ValueError(f"unknown teacher kind {teacher_cfg.kind!r}; known: in_the_box_vit")
