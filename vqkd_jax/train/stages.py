"""Stage name (config.stage) -> the module that builds its Objective via `make_objective`."""

from __future__ import annotations

import importlib

STAGES = {
    "teacher": "vqkd_jax.train.teacher",            # in-the-box supervised ViT teacher
    "teacher_mae": "vqkd_jax.train.teacher_mae",    # in-the-box MAE-style teacher
    "teacher_clip": "vqkd_jax.train.teacher_clip",  # in-the-box CLIP-style teacher (captions)
    "teacher_dino": "vqkd_jax.train.teacher_dino",  # in-the-box DINO-style teacher (+ iBOT term)
    "evaluator": "vqkd_jax.train.evaluator",        # evaluator network for FD_eval
    "vqkd": "vqkd_jax.train.vqkd",                  # VQ-KD tokenizer distilled from a teacher
    "cluster": "vqkd_jax.train.cluster",            # Cluster tokenizer: online-clustered teacher tokens
    "vqgan": "vqkd_jax.train.vqgan",                # VQGAN / FSQ: pixel reconstruction + GAN
    "pixel_decoder": "vqkd_jax.train.pixel_decoder",  # pixels from frozen codes
    "ar": "vqkd_jax.train.ar",                      # class-conditional AR proposal network
    "nar": "vqkd_jax.train.nar",                    # class-conditional masked-token (MaskGIT) network
    "t2i": "vqkd_jax.train.t2i",                    # text-conditioned AR (caption prefix) network
}


def make_objective(config, *, workdir: str, axis_name: str | None):
  if config.stage not in STAGES:
    raise ValueError(f"unknown stage {config.stage!r}; stages: {', '.join(STAGES)}")
  module = importlib.import_module(STAGES[config.stage])
  return module.make_objective(config, workdir=workdir, axis_name=axis_name)
