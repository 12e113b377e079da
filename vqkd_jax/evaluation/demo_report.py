"""The demo's report: every row evaluated (pipeline_report), the table beside the paper's numbers,
details, the three verdicts (verdicts.py), image grids, the codebook visualisation and a plot.

One seed: everything in <workdir> (report.md, report.json, reconstructions.png, samples_ar.png,
samples_nar.png, samples_t2i.png, codebook.png, plot.png; per row <row>/grids/ and the cached
metrics). Several seeds: each seed's report in <workdir>/seed_reports/seed<r>/, and in <workdir> the
table as mean +- std over seeds, the verdict of every seed and overall, seed 0's figures and the
plot with the spread.
"""

from __future__ import annotations

import math
import os
import shutil

import numpy as np

from vqkd_jax.evaluation import codebook_viz, paper, plots, verdicts as verdicts_lib
from vqkd_jax.evaluation.images import make_grid
from vqkd_jax.evaluation.pipeline_report import (GRID_PER_CLASS, Evaluator, evaluate_row,
                                                 load_reference)
from vqkd_jax.evaluation.report import FD_EVAL_NOTE, format_table, write_report

# (key in our rows, header, key in the paper's row, format)
MAIN_COLUMNS = (
    ("codebook_usage", "Codebook usage (%)", "codebook_usage", "{:.1f}"),
    ("rfd_eval", "rFD_eval (paper: rFID)", "rfid", "{:.2f}"),
    ("ppl", "PPL", "ppl", "{:.2f}"),
    ("fd_ar", "FD_eval AR (paper: FID_AR)", "fid_ar", "{:.2f}"),
    ("fd_nar", "FD_eval NAR (paper: FID_NAR)", "fid_nar", "{:.2f}"),
    ("fd_t2i", "FD_eval T2I (paper: FID_T2I)", "fid_t2i", "{:.2f}"),
)
DETAIL_COLUMNS = (
    ("psnr", "PSNR (dB)", "{:.2f}"),
    ("code_perplexity", "Code perplexity", "{:.1f}"),
    ("code_probe_accuracy", "Code probe acc.", "{:.3f}"),
    ("reconstruction_accuracy", "Recon. class acc.", "{:.3f}"),
    ("ar_accuracy", "AR sample acc.", "{:.3f}"),
    ("nar_accuracy", "NAR sample acc.", "{:.3f}"),
    ("t2i_accuracy", "T2I sample acc.", "{:.3f}"),
    ("nar_masked_ppl", "NAR masked PPL", "{:.2f}"),
    ("t2i_ppl", "T2I PPL", "{:.2f}"),
    ("seconds", "Eval. s", "{:.0f}"),
)
COLUMN_NOTES = [
    "Each cell: this run (the paper's number in brackets; the paper's rows are its ImageNet-1k "
    "class-conditional table, the T2I column from its text-to-image table; it has no Cluster "
    "row). Our numbers come from 32x32 procedural images and networks trained for minutes: "
    "compare the order of the rows, not the values.",
    "Codebook usage: % of codes used at least once on the validation split.",
    "rFD_eval: FD_eval of the reconstructions of the validation images (the paper's rFID column, "
    "in the evaluator's features).",
    "PPL: the AR network's perplexity on validation tokens (exp of the mean NLL in nats).",
    "FD_eval AR / NAR / T2I: samples of the class-conditional AR and NAR (MaskGIT-style) "
    "networks and of the caption-conditioned AR network, against the validation images.",
    FD_EVAL_NOTE,
    "Code probe acc.: a ridge classifier on each image's bag of codes, fitted on training images "
    "and scored on the validation split (observation 3's measure of semantic understanding).",
    "Sample acc.: the evaluator's accuracy at the conditioning class (T2I: the class in the "
    "caption) of generated images; chance is 1/12.",
]


def _finite(v) -> bool:
  return isinstance(v, (int, float, np.floating)) and math.isfinite(float(v))


def _paper_cell(label: str, key: str, fmt: str) -> str:
  v = paper.paper_row(label).get(key)
  return f" ({fmt.format(v)})" if v is not None else ""


def main_cells(rows: list[dict], t2i_missing: bool, spread: dict | None = None):
  """(display rows, columns) of the table with the paper's columns: "ours (paper)" cells;
  `spread` {label: {key: std}} adds "± std" (several seeds)."""
  table = []
  for row in rows:
    label = row["tokenizer"]
    out = {"tokenizer": label}
    for key, _, pkey, fmt in MAIN_COLUMNS:
      v = row.get(key)
      if not _finite(v):
        text = "n/a (stage missing)" if key == "fd_t2i" and t2i_missing else "-"
      else:
        text = fmt.format(v)
        if spread is not None and _finite(spread.get(label, {}).get(key)):
          text += " ± " + fmt.format(spread[label][key])
      out[key] = text + _paper_cell(label, pkey, fmt)
    table.append(out)
  cols = [("tokenizer", "Tokenizer", "{}")] + [(k, h, "{}") for k, h, _, _ in MAIN_COLUMNS]
  return table, cols


def main_table(rows: list[dict], t2i_missing: bool, spread: dict | None = None) -> str:
  return format_table(*main_cells(rows, t2i_missing, spread))


def detail_table(rows: list[dict], spread: dict | None = None) -> str:
  table = []
  for row in rows:
    out = {"tokenizer": row["tokenizer"]}
    for key, _, fmt in DETAIL_COLUMNS:
      v = row.get(key)
      text = fmt.format(v) if _finite(v) else "-"
      if spread is not None and _finite(v) and _finite(spread.get(row["tokenizer"], {}).get(key)):
        text += " ± " + fmt.format(spread[row["tokenizer"]][key])
      out[key] = text
    table.append(out)
  cols = [("tokenizer", "Tokenizer", "{}")] + [(k, h, "{}") for k, h, _ in DETAIL_COLUMNS]
  return format_table(table, cols)


def verdict_text(vs: list[dict]) -> str:
  lines = []
  for k, v in enumerate(vs, 1):
    lines.append(f"{k}. *{v['observation']}* **{v['verdict']}**.")
    lines.append(f"   - Rule: {v['rule']}")
    lines.append(f"   - Numbers: {v['evidence']}")
  return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Figures.

def _class_rows(grid_samples: np.ndarray, num_classes: int, per_row: int = 2) -> np.ndarray:
  """Class-major samples [C * GRID_PER_CLASS, ...] -> `per_row` rows of one sample per class."""
  a = grid_samples.reshape(num_classes, GRID_PER_CLASS, *grid_samples.shape[1:])[:, :per_row]
  return np.swapaxes(a, 0, 1).reshape(-1, *grid_samples.shape[1:])


def write_figures(out_dir: str, ref, rows: list[dict], arrays: dict, num_classes: int) -> dict:
  """Grids, codebook visualisation and plot; returns {name: path}."""
  paths = {}
  k = 16
  blocks = [("originals", make_grid(ref.images[:k], ncols=k, upscale=2))]
  blocks += [(r["tokenizer"], make_grid(arrays[r["tokenizer"]]["recon"], ncols=k, upscale=2))
             for r in rows]
  paths["reconstructions"] = plots.save_labelled(os.path.join(out_dir, "reconstructions.png"),
                                                 blocks)
  for name in ("ar", "nar", "t2i"):
    blocks = []
    for r in rows:
      a = arrays[r["tokenizer"]].get(name)
      if a is None:
        continue
      if name == "t2i":
        blocks.append((r["tokenizer"], make_grid(a, ncols=8, upscale=2)))
      else:
        blocks.append((r["tokenizer"], make_grid(_class_rows(a, num_classes), ncols=num_classes,
                                                 upscale=2)))
    if blocks:
      paths[f"samples_{name}"] = plots.save_labelled(
          os.path.join(out_dir, f"samples_{name}.png"), blocks)
  pair = [label for label in ("VQGAN", "VQ-KD_CLIP") if label in arrays]
  if pair:
    paths["codebook"] = codebook_viz.save_codebook_grids(
        os.path.join(out_dir, "codebook.png"), ref.images,
        {label: (arrays[label]["val_indices"].astype(np.int64),
                 next(r["num_codes"] for r in rows if r["tokenizer"] == label))
         for label in pair})
  paths["plot"] = write_plot(os.path.join(out_dir, "plot.png"), rows)
  return paths


def write_plot(path: str, rows: list[dict], spread: dict | None = None) -> str:
  labels = [r["tokenizer"] for r in rows]
  err = lambda key: [(spread or {}).get(l, {}).get(key) for l in labels]
  panels = [
      plots.draw_panel("PPL of the AR network on validation tokens (lower is better)", labels,
                       {"PPL": [r.get("ppl") for r in rows]}, {"PPL": err("ppl")}),
      plots.draw_panel("FD_eval of generated images (evaluator features, not FID; lower is "
                       "better)", labels,
                       {g: [r.get(k) for r in rows] for k, g in
                        (("fd_ar", "AR"), ("fd_nar", "NAR"), ("fd_t2i", "T2I"))},
                       {g: err(k) for k, g in (("fd_ar", "AR"), ("fd_nar", "NAR"),
                                               ("fd_t2i", "T2I"))}),
      plots.draw_panel("rFD_eval of reconstructions; code probe accuracy x 100", labels,
                       {"rFD_eval": [r.get("rfd_eval") for r in rows],
                        "probe x100": [100 * r["code_probe_accuracy"]
                                       if _finite(r.get("code_probe_accuracy")) else None
                                       for r in rows]},
                       {"rFD_eval": err("rfd_eval"),
                        "probe x100": [100 * e if _finite(e) else None
                                       for e in err("code_probe_accuracy")]}),
  ]
  return plots.save_panels(path, panels)


# ----------------------------------------------------------------------------------------------
# The report.

def _aggregate(per_seed_rows: list[list[dict]]) -> tuple[list[dict], dict]:
  """Mean rows and {label: {key: std (ddof 1)}} over seeds."""
  mean_rows, spread = [], {}
  for i, row in enumerate(per_seed_rows[0]):
    label = row["tokenizer"]
    m, s = {"tokenizer": label}, {}
    for key in row:
      vals = [rows[i].get(key) for rows in per_seed_rows]
      if all(_finite(v) for v in vals):
        m[key] = float(np.mean(vals))
        s[key] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
      elif key not in m:
        m[key] = row[key] if not _finite(row[key]) else None
    mean_rows.append(m)
    spread[label] = s
  return mean_rows, spread


def _notes(cfg, ref, rows) -> list[str]:
  notes = list(COLUMN_NOTES)
  notes.append(f"Evaluator accuracy on the validation split: {ref.accuracy:.3f} "
               f"({len(ref.images)} images); {cfg.report.num_samples} samples per FD_eval, CFG "
               f"{cfg.report.cfg_scale}, temperature {cfg.report.temperature}, top-k "
               f"{cfg.report.top_k}, top-p {cfg.report.top_p}.")
  if ref.accuracy < cfg.report.min_evaluator_accuracy:
    notes.append(f"WARNING: the evaluator is below {cfg.report.min_evaluator_accuracy:.0%} "
                 f"validation accuracy; FD_eval is not trustworthy.")
  notes.append("Cluster_CLIP clusters the CLIP-style teacher's patch tokens, as upstream's "
               "Cluster pipeline does with CLIP.")
  return notes


def _figures_text(paths: dict, base: str) -> str:
  return "\n".join(f"- {name}: `{os.path.relpath(p, base)}`" for name, p in paths.items())


_EVALUATOR = {}


def _evaluate_row_task(label, stage_dirs, ref, evaluator_dir, report_cfg, out_dir):
  """evaluate_row in a worker process (the evaluator network loaded once per process)."""
  if evaluator_dir not in _EVALUATOR:
    _EVALUATOR[evaluator_dir] = Evaluator(evaluator_dir)
  return evaluate_row(label, stage_dirs, ref, _EVALUATOR[evaluator_dir], report_cfg, out_dir,
                      evaluator_dir)


def reference_config(cfg):
  """The evaluator stage's config with the demo's data directory: what load_reference reads."""
  data_cfg = cfg.shared.evaluator.copy_and_resolve_references()
  with data_cfg.unlocked():
    data_cfg.data.data_dir = cfg.data_dir
  return data_cfg


def row_jobs(cfg, rows_dirs: list[dict]) -> list[list[tuple]]:
  """Per repeat, the evaluate_row jobs of its rows: (label, stage dirs, report cfg, out dir,
  name). `write` and the demo's early evaluation (`evaluate_row_early`) build them alike, so
  that the report finds the rows evaluated early in their caches."""
  out = []
  for r, dirs in enumerate(rows_dirs):
    report_cfg = cfg.report.copy_and_resolve_references()
    with report_cfg.unlocked():
      report_cfg.seed = cfg.report.seed + r
    out.append([(cfg.rows[key].label, dirs[key], report_cfg,
                 os.path.dirname(dirs[key]["tokenizer"]), f"{'' if r == 0 else f'seed{r}/'}{key}")
                for key in cfg.row_order])
  return out


_REFERENCE = {}


def evaluate_row_early(job: tuple, data_cfg, probe_train: int, evaluator_dir: str) -> float:
  """One row's evaluation in a worker of the demo's stage pool, as soon as its stages and the
  evaluator are trained (the reference loaded once per process): it runs beside the stages
  still training instead of after them, and `write` then reads it from the row's cache.
  Returns its seconds."""
  if evaluator_dir not in _REFERENCE:
    if evaluator_dir not in _EVALUATOR:
      _EVALUATOR[evaluator_dir] = Evaluator(evaluator_dir)
    _REFERENCE[evaluator_dir] = load_reference(data_cfg, _EVALUATOR[evaluator_dir], probe_train)
  label, dirs, report_cfg, out_dir, _ = job
  row, _ = _evaluate_row_task(label, dirs, _REFERENCE[evaluator_dir], evaluator_dir, report_cfg,
                              out_dir)
  return float(row.get("seconds", 0.0))


def evaluate_rows(jobs, ref, evaluator, evaluator_dir: str, workers: int) -> list:
  """[(row, arrays)] for jobs [(label, stage dirs, report cfg, out dir, name)], in order; rows
  evaluated `workers` at a time in worker processes (the demo's), or here when workers is 1."""
  if workers <= 1:
    out = []
    for label, dirs, report_cfg, out_dir, name in jobs:
      print(f"      evaluating {name}", flush=True)
      out.append(evaluate_row(label, dirs, ref, evaluator, report_cfg, out_dir, evaluator_dir))
    return out
  import concurrent.futures as cf
  import multiprocessing

  from vqkd_jax.demo import worker_init
  cache_dir = jax_cache_dir()
  with cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                              initializer=worker_init, initargs=(cache_dir,)) as pool:
    futures = []
    for label, dirs, report_cfg, out_dir, name in jobs:
      futures.append(pool.submit(_evaluate_row_task, label, dirs, ref, evaluator_dir, report_cfg,
                                 out_dir))
    out = []
    for (_, _, _, _, name), future in zip(jobs, futures):
      out.append(future.result())
      print(f"      evaluated {name} in {out[-1][0].get('seconds', 0):.0f} s", flush=True)
    return out


def jax_cache_dir() -> str:
  import jax
  return jax.config.jax_compilation_cache_dir or ""


def write(cfg, workdir: str, rows_dirs: list[dict], shared_dirs: list[dict]) -> str:
  """Evaluates every row of every repeat and writes the report(s); returns the markdown printed
  to the console (main table and verdicts)."""
  evaluator_dir = shared_dirs[0]["evaluator"]
  evaluator = Evaluator(evaluator_dir)
  data_cfg = reference_config(cfg)
  ref = load_reference(data_cfg, evaluator, cfg.report.probe_train)
  num_classes = data_cfg.model.num_classes
  t2i_missing = not any("t2i" in r for r in cfg.rows.values())
  title = "VQ-KD in a box: the paper's study on the built-in dataset"
  per_seed_rows, per_seed_verdicts, seed0_paths = [], [], {}
  for r, jobs in enumerate(row_jobs(cfg, rows_dirs)):
    results = evaluate_rows(jobs, ref, evaluator, evaluator_dir, cfg.workers)
    rows = [row for row, _ in results]
    arrays = {row["tokenizer"]: arr for row, arr in results}
    out = workdir if cfg.seeds == 1 else os.path.join(workdir, "seed_reports", f"seed{r}")
    paths = write_figures(out, ref, rows, arrays, num_classes)
    vs = verdicts_lib.verdicts(rows)
    sections = [("Verdicts on the paper's observations", verdict_text(vs)),
                ("Details", detail_table(rows)),
                ("Figures", _figures_text(paths, out))]
    display, cols = main_cells(rows, t2i_missing)
    write_report(rows, cols, out, title + (f" (seed {r})" if cfg.seeds > 1 else ""),
                 notes=_notes(cfg, ref, rows), display_rows=display, sections=sections,
                 extra={"verdicts": vs, "evaluator_accuracy": ref.accuracy, "seed": r,
                        "paper": {r["tokenizer"]: paper.paper_row(r["tokenizer"]) for r in rows}})
    per_seed_rows.append(rows)
    per_seed_verdicts.append(vs)
    if r == 0:
      seed0_paths = paths
  if cfg.seeds == 1:
    rows, vs = per_seed_rows[0], per_seed_verdicts[0]
    return (f"{main_table(rows, t2i_missing)}\n\nVerdicts:\n{verdict_text(vs)}\n\n"
            f"{_figures_text(seed0_paths, workdir)}")

  mean_rows, spread = _aggregate(per_seed_rows)
  overall = verdicts_lib.combine(per_seed_verdicts)
  paths = {}
  for name, p in seed0_paths.items():
    if name != "plot":
      paths[name] = shutil.copy(p, os.path.join(workdir, os.path.basename(p)))
  paths["plot"] = write_plot(os.path.join(workdir, "plot.png"), mean_rows, spread)
  per_seed_text = "\n".join(
      f"- seed {r}: " + "; ".join(f"observation {k}: {v['verdict']}" for k, v in enumerate(vs, 1))
      for r, vs in enumerate(per_seed_verdicts))
  display, cols = main_cells(mean_rows, t2i_missing, spread)
  table = format_table(display, cols)
  write_report(mean_rows, cols, workdir, title + f" ({cfg.seeds} seeds: mean ± std)",
               notes=_notes(cfg, ref, mean_rows), display_rows=display,
               sections=[("Verdicts on the paper's observations, over seeds", verdict_text(overall)),
                         ("Verdict per seed", per_seed_text),
                         ("Details", detail_table(mean_rows, spread)),
                         ("Figures (seed 0; plot: mean ± std)", _figures_text(paths, workdir))],
               extra={"verdicts": overall, "per_seed_verdicts": per_seed_verdicts,
                      "per_seed_rows": per_seed_rows, "spread": spread,
                      "evaluator_accuracy": ref.accuracy, "seeds": cfg.seeds})
  return (f"{table}\n\nVerdicts over {cfg.seeds} seeds:\n{verdict_text(overall)}\n\n"
          f"Per seed:\n{per_seed_text}")
