"""`vqkd demo`: the walking skeleton, every stage in order on the built-in dataset.

a. teacher (in-the-box supervised ViT) and evaluator network; b. VQ-KD tokenizer; c. pixel decoder;
d. class-conditional AR prior; e. report (table + grids). Each stage trains in `<workdir>/<stage>`;
a stage whose newest checkpoint is its last step, with the same config, is reused.
"""

from __future__ import annotations

import json
import os
import time

from vqkd_jax.config import load_config_with_overrides

STAGES = ("teacher", "evaluator", "tokenizer", "pixel_decoder", "ar")


def stage_configs(cfg, workdir: str) -> dict:
  """The stage configs of the demo config with their cross references filled in."""
  dirs = {name: os.path.abspath(os.path.join(workdir, name)) for name in STAGES}
  with cfg.unlocked():
    for name in STAGES:
      cfg[name].data.data_dir = cfg.data_dir
    cfg.tokenizer.teacher.workdir = dirs["teacher"]
    cfg.pixel_decoder.tokenizer_workdir = dirs["tokenizer"]
    cfg.ar.tokenizer_workdir = dirs["tokenizer"]
  return {name: cfg[name] for name in STAGES}, dirs


def is_finished(stage_cfg, stage_dir: str) -> bool:
  """True when `stage_dir` holds the final checkpoint of this exact config; raises if it holds a
  run of another config (nothing is overwritten)."""
  from vqkd_jax.train.checkpoint import Checkpointer

  if not os.path.isdir(os.path.join(stage_dir, "checkpoints")):
    return False
  saved_path = os.path.join(stage_dir, "config.json")
  if os.path.exists(saved_path):
    with open(saved_path) as f:
      saved = json.load(f)
    if saved != json.loads(stage_cfg.to_json_best_effort()):
      raise ValueError(f"{stage_dir} holds a run of a different config; use another --workdir "
                       f"or remove that directory")
  ckpt = Checkpointer(os.path.join(stage_dir, "checkpoints"), async_save=False)
  try:
    return ckpt.latest_step() == stage_cfg.total_steps
  finally:
    ckpt.close()


def run(workdir: str, config_spec: str, overrides: list[str]) -> int:
  from vqkd_jax.evaluation import pipeline_report
  from vqkd_jax.train.loop import train

  cfg = load_config_with_overrides(config_spec, overrides)
  os.makedirs(workdir, exist_ok=True)
  configs, dirs = stage_configs(cfg, workdir)
  timings = {}
  t_all = time.time()

  print(f"== vqkd demo in {os.path.abspath(workdir)} ==", flush=True)
  t = time.time()
  from vqkd_jax.data.pipeline import load_dataset
  load_dataset(cfg.teacher.data.name, cfg.data_dir, cfg.teacher.data.image_size)
  timings["data"] = time.time() - t
  print(f"[data] built-in dataset ready in {timings['data']:.1f} s", flush=True)

  for i, name in enumerate(STAGES, 1):
    stage_cfg, stage_dir = configs[name], dirs[name]
    if is_finished(stage_cfg, stage_dir):
      print(f"[{i}/{len(STAGES) + 1}] {name}: finished earlier, reusing {stage_dir}", flush=True)
      continue
    print(f"[{i}/{len(STAGES) + 1}] {name}: {stage_cfg.total_steps} steps -> {stage_dir}",
          flush=True)
    t = time.time()
    result = train(stage_cfg, stage_dir)
    timings[name] = time.time() - t
    evals = [h for h in result.history if any(k.startswith("eval/") for k in h)]
    summary = ", ".join(f"{k[5:]}={v:.4g}" for k, v in (evals[-1] if evals else {}).items()
                        if k.startswith("eval/"))
    print(f"    {name} done in {timings[name]:.0f} s {summary}", flush=True)

  print(f"[{len(STAGES) + 1}/{len(STAGES) + 1}] report: sampling and metrics", flush=True)
  t = time.time()
  row = pipeline_report.evaluate_pipeline(dirs, configs["ar"], cfg.report, workdir)
  timings["report"] = time.time() - t
  notes = [
      "FD_eval is the Fréchet distance between generated and validation images in the features of "
      "the in-the-box evaluator network (a CNN trained on this dataset), not FID.",
      f"Evaluator accuracy on validation: {row['evaluator_val_accuracy']:.3f}; on reconstructions: "
      f"{row['reconstruction_accuracy']:.3f}; {row['num_samples']} samples, CFG "
      f"{cfg.report.cfg_scale}, top-k {cfg.report.top_k}, top-p {cfg.report.top_p}.",
  ]
  if row["evaluator_val_accuracy"] < 0.9:
    notes.append("WARNING: the evaluator is below 90% validation accuracy; FD_eval is not "
                 "trustworthy.")
  table = pipeline_report.write_table([row], workdir, notes)
  timings["total"] = time.time() - t_all
  with open(os.path.join(workdir, "timings.json"), "w") as f:
    json.dump(timings, f, indent=2)
  print(table, flush=True)
  print(f"grids: {workdir}/reconstructions.png, {workdir}/samples.png; "
        f"total {timings['total']:.0f} s", flush=True)
  return 0
