"""Stage e: evaluate a finished pipeline (tokenizer, pixel decoder, AR prior) and write the table.

Columns: codebook usage over the validation split, reconstruction PSNR, the AR prior's perplexity on
validation tokens (the paper's PPL), FD_eval between generated and validation images in the features
of the in-the-box evaluator network (NOT FID), and the evaluator's accuracy on the samples.
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np

from vqkd_jax.evaluation import metrics as metrics_lib
from vqkd_jax.evaluation.frechet import FeatureStatistics, frechet_distance
from vqkd_jax.evaluation.images import save_grid
from vqkd_jax.evaluation.report import SKELETON_COLUMNS, write_report



def evaluate_pipeline(stage_dirs: dict, ar_config, report_cfg, out_dir: str,
                      name: str = "VQ-KD") -> dict:
  """Evaluates one tokenizer row of the table.

  Args:
    stage_dirs: work directories {"tokenizer", "pixel_decoder", "ar", "evaluator"}.
    ar_config: the AR stage's config (its data group names the validation split).
    report_cfg: num_samples, cfg_scale, temperature, top_k, top_p, seed.
    out_dir: where grids go.
  Returns: the row (dict) with the report.SKELETON_COLUMNS keys and timings.
  """
  from vqkd_jax.api import Generator
  from vqkd_jax.train import ar as ar_stage
  from vqkd_jax.train import evaluator as evaluator_stage
  from vqkd_jax.train.evaluate import map_split
  from vqkd_jax.train.loop import load_trained

  t0 = time.time()
  gen = Generator(stage_dirs["ar"], stage_dirs["pixel_decoder"])
  tok = gen.tokenizer
  val = map_split(ar_config, lambda b: {"image": b["image"], "label": b["label"]})
  images, labels = val["image"], val["label"]

  # Tokenizer: codebook usage and reconstructions.
  indices = np.concatenate([tok.encode(images[i:i + 500]) for i in range(0, len(images), 500)])
  counts = np.bincount(indices.ravel(), minlength=tok.num_codes)
  recon = np.concatenate([tok.decode(indices[i:i + 500]) for i in range(0, len(indices), 500)])
  row = {"tokenizer": name,
         "codebook_usage": 100.0 * metrics_lib.codebook_usage(counts),
         "code_perplexity": metrics_lib.code_perplexity(counts),
         "psnr": metrics_lib.psnr(images, recon)}

  # Proposal network: perplexity on validation tokens.
  row["ppl"] = ar_stage.validation_perplexity(
      ar_config, gen.model, gen.variables,
      lambda x: tok.frozen.encode(tok.variables, x).reshape(x.shape[0], -1),
      gen.num_classes)

  # Samples: one per validation label (first num_samples), decoded and scored by the evaluator.
  n = min(report_cfg.num_samples, len(labels))
  t_sample = time.time()
  samples = gen.sample(labels[:n], cfg_scale=report_cfg.cfg_scale,
                       temperature=report_cfg.temperature, top_k=report_cfg.top_k,
                       top_p=report_cfg.top_p, seed=report_cfg.seed)
  row["sampling_seconds"] = time.time() - t_sample
  trained = load_trained(stage_dirs["evaluator"])
  evaluator = evaluator_stage.build_model(trained["config"]["model"])
  predict = evaluator_stage.make_predict_fn(evaluator, trained["params"], trained["model_state"])

  def features(x):
    outs = [jax.device_get(predict(x[i:i + 500])) for i in range(0, len(x), 500)]
    return (np.concatenate([o["features"] for o in outs]),
            np.concatenate([o["logits"] for o in outs]))

  f_val, logits_val = features(images)
  f_gen, logits_gen = features(samples)
  stats_val, stats_gen = FeatureStatistics(), FeatureStatistics()
  stats_val.update(f_val)
  stats_gen.update(f_gen)
  row["fd_eval"] = frechet_distance(stats_gen.mean(), stats_gen.covariance(), stats_val.mean(),
                                    stats_val.covariance())
  _, logits_rec = features(recon)
  row["sample_accuracy"] = float(np.mean(np.argmax(logits_gen, -1) == labels[:n]))
  row["evaluator_val_accuracy"] = float(np.mean(np.argmax(logits_val, -1) == labels))
  row["reconstruction_accuracy"] = float(np.mean(np.argmax(logits_rec, -1) == labels))
  row["num_samples"] = n

  # Grids: originals over reconstructions; samples by class (one row per class).
  os.makedirs(out_dir, exist_ok=True)
  k = min(16, len(images))
  save_grid(np.concatenate([images[:k], recon[:k]]), os.path.join(out_dir, "reconstructions.png"),
            ncols=k, upscale=2)
  per_class = 10
  grid_labels = np.repeat(np.arange(gen.num_classes), per_class)
  grid = gen.sample(grid_labels, cfg_scale=report_cfg.cfg_scale, temperature=report_cfg.temperature,
                    top_k=report_cfg.top_k, top_p=report_cfg.top_p, seed=report_cfg.seed + 1)
  save_grid(grid, os.path.join(out_dir, "samples.png"), ncols=per_class, upscale=2)
  row["seconds"] = time.time() - t0
  return row


def write_table(rows: list[dict], out_dir: str, notes: list[str]) -> str:
  """report.md + report.json under out_dir; returns the markdown."""
  return write_report(rows, SKELETON_COLUMNS, out_dir, title="vqkd_jax walking skeleton (built-in dataset)",
                      notes=notes)
