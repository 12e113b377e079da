"""`vqkd demo`: the paper in a box. Every stage of every row of configs/demo/demo.py, in order, on
the built-in dataset; then the table beside the paper's numbers, grids, codebook visualisation, a
plot and a verdict on each of the paper's three observations.

Stages train in `<workdir>/shared/<stage>` (teachers, perceptual network, evaluator) and
`<workdir>/<row>/<stage>` (tokenizer, pixel_decoder, ar, nar, t2i); repeat r > 0 of a `seeds`
study in `<workdir>/seed<r>/...` (the evaluator stays shared). A stage whose newest checkpoint is
its last step, with the same config, is reused; a directory holding another config is never
overwritten. Each row's metrics are cached beside its stages (evaluation/pipeline_report.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import time


from vqkd_jax.config import load_config_with_overrides

ROW_STAGES = ("tokenizer", "pixel_decoder", "ar", "nar", "t2i")
# Rough cost of one training example per stage, in ms on 2 CPU cores (measured at demo sizes; only
# the ETA uses them, calibrated on the stages already run), and of one report row per sample.
COST_MS_PER_EXAMPLE = dict(teacher=3.0, teacher_mae=1.6, teacher_clip=2.8, teacher_dino=8.0,
                           perceptual=2.0, evaluator=2.7, vqgan=6.0, vqkd=3.9, cluster=1.2,
                           pixel_decoder=4.5, ar=3.1, nar=3.9, t2i=3.4)
STAGE_OVERHEAD_S = 8.0
REPORT_S_PER_SAMPLE = 0.02


@dataclasses.dataclass
class Stage:
  name: str        # "shared/teacher_clip", "vqgan/ar", "seed1/vqgan/ar"
  config: object   # the stage's ConfigDict, cross references filled in
  workdir: str
  repeat: int
  needs: tuple = ()  # work directories of the stages it reads

  def estimate_s(self) -> float:
    c = self.config
    ms = COST_MS_PER_EXAMPLE.get(c.stage, 3.0)
    return STAGE_OVERHEAD_S + c.total_steps * c.batch_size * ms / 1e3


def _uses_perceptual(c) -> bool:
  return "loss" in c and "perceptual" in c.loss and c.loss.perceptual.kind == "in_the_box"


def _referenced_workdirs(c) -> set:
  """Every non-empty string field named *workdir in a (nested) config."""
  import ml_collections
  out = set()
  for k, v in c.items():
    if isinstance(v, ml_collections.ConfigDict):
      out |= _referenced_workdirs(v)
    elif k.endswith("workdir") and isinstance(v, str) and v:
      out.add(v)
  return out


def plan(cfg, workdir: str):
  """The ordered stages of the demo config's rows (cfg.row_order) and the shared stages they read,
  and per repeat {row: {stage: workdir}} and {shared key: workdir}. Cross references (teacher,
  tokenizer, pixel decoder, perceptual network, text encoder workdirs), the data directory and
  the seeds are filled into copies of the configs; each stage's `needs` lists the stages it
  reads."""
  workdir = os.path.abspath(workdir)
  rows = [cfg.rows[k] for k in cfg.row_order]
  needed = {"evaluator"} | {r.teacher for r in rows if r.teacher}
  if any(_uses_perceptual(r[s]) for r in rows for s in ROW_STAGES if s in r):
    needed.add("perceptual")
  if any("t2i" in r and r.t2i.text_encoder.kind == "in_the_box" for r in rows):
    needed.add("teacher_clip")
  missing = needed - set(cfg.shared)
  if missing:
    raise ValueError(f"the rows need shared stages {sorted(missing)} that the config lacks")
  stages, rows_dirs, shared_dirs = [], [], []

  def add(name, c, d, repeat):
    c = c.copy_and_resolve_references()
    with c.unlocked():
      c.data.data_dir = cfg.data_dir
      c.seed = c.seed + repeat
    stages.append(Stage(name, c, d, repeat))
    return c

  evaluator_dir = os.path.join(workdir, "shared", "evaluator")
  for r in range(cfg.seeds):
    base = workdir if r == 0 else os.path.join(workdir, f"seed{r}")
    prefix = "" if r == 0 else f"seed{r}/"
    shared = {"evaluator": evaluator_dir}
    for key, c in cfg.shared.items():
      if key == "evaluator" or key not in needed:
        continue
      shared[key] = os.path.join(base, "shared", key)
      add(f"{prefix}shared/{key}", c, shared[key], r)
    if r == 0:
      add("shared/evaluator", cfg.shared.evaluator, evaluator_dir, 0)
    dirs = {}
    for row_key in cfg.row_order:
      row = cfg.rows[row_key]
      d = {s: os.path.join(base, row_key, s) for s in ROW_STAGES if s in row}
      dirs[row_key] = d
      for s in ROW_STAGES:
        if s not in row:
          continue
        c = add(f"{prefix}{row_key}/{s}", row[s], d[s], r)
        with c.unlocked():
          if s == "tokenizer" and "teacher" in c:
            c.teacher.workdir = shared[row.teacher]
          if s != "tokenizer":
            c.tokenizer_workdir = d["tokenizer"]
          if _uses_perceptual(c):
            c.loss.perceptual.workdir = shared["perceptual"]
          if s == "t2i":
            if c.text_encoder.kind == "in_the_box":
              c.text_encoder.workdir = shared["teacher_clip"]
            c.pixel_decoder_workdir = d.get("pixel_decoder", "")
    rows_dirs.append(dirs)
    shared_dirs.append(shared)
  planned = {s.workdir for s in stages}
  for s in stages:
    s.needs = tuple(sorted(_referenced_workdirs(s.config) & planned))
  return stages, rows_dirs, shared_dirs


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


CODE_FINGERPRINT_FILE = "code_fingerprint"


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
  """12 hex digits of the SHA-256 of the package's Python sources (relative paths and bytes): what
  a stage was trained with. A reused stage of another fingerprint is reported (not retrained: a
  finished directory is never overwritten), so that a table is not read as one code version's
  when its stages were trained by several."""
  root = os.path.dirname(os.path.abspath(__file__))
  h = hashlib.sha256()
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames.sort()
    for name in sorted(filenames):
      if name.endswith(".py"):
        path = os.path.join(dirpath, name)
        h.update(os.path.relpath(path, root).encode() + b"\0")
        with open(path, "rb") as f:
          h.update(f.read() + b"\0")
  return h.hexdigest()[:12]


def stage_fingerprint(stage_dir: str) -> str | None:
  """The code fingerprint a finished stage was trained with (None: not recorded)."""
  try:
    with open(os.path.join(stage_dir, CODE_FINGERPRINT_FILE)) as f:
      return f.read().strip() or None
  except OSError:
    return None


def _clock(seconds: float) -> str:
  seconds = max(0, int(round(seconds)))
  return f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
  """Console lines `[i/N] text | elapsed m:ss | ETA m:ss`. The ETA is the remaining stages'
  estimated cost (steps x batch x a per-stage rate, Stage.estimate_s) scaled by how the stages
  trained so far compared with their estimates, divided by the number of workers."""

  def __init__(self, stages: list[Stage], report_estimate_s: float, workers: int = 1):
    self.total = len(stages) + 1
    self.estimates = [s.estimate_s() for s in stages] + [report_estimate_s]
    self.workers = workers
    self.start = time.time()
    self.spent = 0.0       # wall seconds of the stages trained in this call
    self.estimated = 0.0   # their estimates
    self._left = list(self.estimates)
    self.count = 0         # stages done (trained or reused)

  def eta(self) -> float:
    scale = self.spent / self.estimated if self.estimated > 0 else 1.0
    return scale * (sum(self._left[:-1]) / self.workers + self._left[-1])

  def line(self, text: str, i: int | None = None) -> str:
    i = self.count if i is None else i
    return (f"[{i + 1:>2}/{self.total}] {text} | elapsed {_clock(time.time() - self.start)} | "
            f"ETA {_clock(self.eta())}")

  def finish(self, i: int, seconds: float | None) -> None:
    """Stage i is done: trained in `seconds`, or reused (None)."""
    if seconds is not None:
      self.spent += seconds
      self.estimated += self.estimates[i]
    self._left[i] = 0.0
    self.count += 1


# ----------------------------------------------------------------------------------------------
# Running the stages: in this process (workers=1), or up to `workers` at once in worker processes.
# A stage of the small demo networks keeps about one of two CPU cores busy, so two at a time
# nearly double the throughput on a 2-core machine (measured: an AR and a NAR stage together took
# 28 s, 24 s and 26 s alone).

def _quiet_logging() -> None:
  import logging
  for noisy in ("absl", "jax._src", "orbax", "etils", "tensorflow_datasets"):
    logging.getLogger(noisy).setLevel(logging.WARNING)


def worker_init(cache_dir: str) -> None:
  import jax
  from absl import flags

  flags.FLAGS.mark_as_parsed()  # grain reads absl flags
  if cache_dir:
    for n, v in (("jax_compilation_cache_dir", cache_dir),
                 ("jax_persistent_cache_min_compile_time_secs", 0),
                 ("jax_persistent_cache_min_entry_size_bytes", 0)):
      jax.config.update(n, v)
  _quiet_logging()


def _eval_summary(history: list[dict]) -> str:
  evals = [h for h in history if any(k.startswith("eval/") for k in h)]
  return ", ".join(f"{k[5:]}={v:.4g}" for k, v in (evals[-1] if evals else {}).items()
                   if k.startswith("eval/") and isinstance(v, (int, float)))


def train_stage(config, workdir: str, log_path: str | None = None) -> tuple[float, str]:
  """Trains one stage; returns (seconds, its last evaluation as text). With `log_path`, the
  stage's console output (progress bar, logging) goes to that file."""
  import logging

  from vqkd_jax.train.loop import train

  t = time.time()
  if log_path is None:
    result = train(config, workdir)
    _record_fingerprint(workdir)
    return time.time() - t, _eval_summary(result.history)
  os.makedirs(os.path.dirname(log_path), exist_ok=True)
  with open(log_path, "a") as log, contextlib.redirect_stdout(log), \
      contextlib.redirect_stderr(log):
    handler = logging.StreamHandler(log)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    old_handlers, old_level = root.handlers[:], root.level
    root.handlers, root.level = [handler], logging.INFO
    try:
      result = train(config, workdir)
    finally:
      root.handlers, root.level = old_handlers, old_level
  _record_fingerprint(workdir)
  return time.time() - t, _eval_summary(result.history)


def _record_fingerprint(workdir: str) -> None:
  with open(os.path.join(workdir, CODE_FINGERPRINT_FILE), "w") as f:
    f.write(code_fingerprint() + "\n")


def _latest_step(workdir: str) -> int | None:
  """The step of the last line of a running stage's metrics.jsonl (None before the first)."""
  try:
    with open(os.path.join(workdir, "metrics.jsonl"), "rb") as f:
      lines = f.read().splitlines()
    return int(json.loads(lines[-1])["step"]) if lines else None
  except (OSError, ValueError, KeyError):
    return None


def run_stages(stages: list[Stage], progress: Progress, workers: int, cache_dir: str,
               timings: dict, evaluations: list[tuple] = ()) -> None:
  """Trains every unfinished stage once the stages it needs are done; reuses finished ones.

  evaluations: (name, needs, fn, args) tasks (the report's rows) that run in the same workers
  once the stages they need are done, when no stage is ready to train (with several workers
  only): the report's work then overlaps the last stages' instead of following them."""
  done = set()
  todo = []
  for i, stage in enumerate(stages):
    if is_finished(stage.config, stage.workdir):
      trained_by = stage_fingerprint(stage.workdir)
      stale = "" if trained_by == code_fingerprint() else (
          f" (trained by other code: {trained_by or 'unrecorded'}, now {code_fingerprint()}; "
          f"remove {stage.workdir} to retrain it)")
      print(progress.line(f"{stage.name}: finished earlier, reusing{stale}"), flush=True)
      progress.finish(i, None)
      done.add(stage.workdir)
    else:
      todo.append(i)
  describe = lambda s: (f"{s.name} ({s.config.stage}, {s.config.total_steps} steps x "
                        f"{s.config.batch_size})")

  def finished(i, seconds, summary):
    timings[stages[i].name] = seconds
    progress.finish(i, seconds)
    done.add(stages[i].workdir)
    print(f"      {stages[i].name} done in {seconds:.0f} s {summary}".rstrip(), flush=True)

  if workers <= 1:
    for i in todo:
      print(progress.line(describe(stages[i])), flush=True)
      finished(i, *train_stage(stages[i].config, stages[i].workdir))
    return

  import concurrent.futures as cf
  import multiprocessing

  ctx = multiprocessing.get_context("spawn")  # JAX does not survive fork
  pending = list(evaluations)
  # `running` maps futures to stage indices or to evaluation tasks (tuples).
  job_name = lambda job: job[0] if isinstance(job, tuple) else stages[job].name
  with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=worker_init,
                              initargs=(cache_dir,)) as pool:
    running = {}
    last_status = time.time()
    while todo or running or pending:
      for i in list(todo):
        if len(running) >= workers:
          break
        if all(d in done for d in stages[i].needs):
          s = stages[i]
          print(progress.line(describe(s) + f", log {os.path.join(s.workdir, 'train.log')}",
                              progress.count + len(running)), flush=True)
          running[pool.submit(train_stage, s.config, s.workdir,
                              os.path.join(s.workdir, "train.log"))] = i
          todo.remove(i)
      for task in list(pending):
        if len(running) >= workers:
          break
        name, needs, fn, args = task
        if all(d in done for d in needs):
          print(f"      evaluating {name} (report row) beside the stages", flush=True)
          running[pool.submit(fn, *args)] = task
          pending.remove(task)
      if not running:
        raise RuntimeError(f"{[job_name(job) for job in todo + pending]} wait for stages that are "
                           f"not in the plan")
      finished_now, _ = cf.wait(running, timeout=5, return_when=cf.FIRST_COMPLETED)
      for future in finished_now:
        i = running.pop(future)
        try:
          if isinstance(i, tuple):   # an evaluation: the report reads its result from the cache
            timings[f"report/{i[0]}"] = future.result()
            print(f"      evaluated {i[0]} in {timings[f'report/{i[0]}']:.0f} s", flush=True)
          else:
            finished(i, *future.result())
        except Exception:
          log = "" if isinstance(i, tuple) else f": see {stages[i].workdir}/train.log"
          print(f"      {job_name(i)} FAILED{log}", flush=True)
          for other in running:
            other.cancel()
          raise
      if not finished_now and time.time() - last_status >= 30:
        last_status = time.time()
        now = ", ".join(f"{job_name(i)} (report row)" if isinstance(i, tuple) else
                        f"{job_name(i)} {_latest_step(stages[i].workdir) or 0}/"
                        f"{stages[i].config.total_steps}" for i in running.values())
        print(f"      running: {now} | elapsed {_clock(time.time() - progress.start)} | "
              f"ETA {_clock(progress.eta())}", flush=True)


@contextlib.contextmanager
def compilation_cache(directory: str):
  """JAX's persistent compilation cache in `directory` for the duration (every program cached):
  rows whose stages are the same programs on other weights (the four VQ-KD rows' pixel decoders,
  AR and NAR networks, samplers) compile once, and a rerun compiles nothing again."""
  import jax

  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  old = {n: getattr(jax.config, n) for n in names}
  for n, v in zip(names, (directory, 0, 0)):
    jax.config.update(n, v)
  try:
    yield
  finally:
    for n, v in old.items():
      jax.config.update(n, v)


def _early_evaluations(cfg, rows_dirs: list[dict], shared_dirs: list[dict]) -> list[tuple]:
  """The report's row evaluations as run_stages tasks: each needs its row's stages and the
  evaluator (demo_report.evaluate_row_early)."""
  from vqkd_jax.evaluation import demo_report
  data_cfg = demo_report.reference_config(cfg)
  evaluator_dir = shared_dirs[0]["evaluator"]
  out = []
  for jobs in demo_report.row_jobs(cfg, rows_dirs):
    for job in jobs:
      needs = (*job[1].values(), evaluator_dir)
      out.append((job[4], needs, demo_report.evaluate_row_early,
                  (job, data_cfg, cfg.report.probe_train, evaluator_dir)))
  return out


def run(workdir: str, config_spec: str, overrides: list[str]) -> int:
  cfg = load_config_with_overrides(config_spec, overrides)
  os.makedirs(workdir, exist_ok=True)
  cache_dir = os.path.join(os.path.abspath(workdir), ".jax_cache")
  with compilation_cache(cache_dir):
    return _run(cfg, workdir, cache_dir)


def _run(cfg, workdir: str, cache_dir: str) -> int:
  stages, rows_dirs, shared_dirs = plan(cfg, workdir)
  num_rows = len(cfg.row_order) * cfg.seeds
  progress = Progress(stages, num_rows * (10.0 + REPORT_S_PER_SAMPLE * cfg.report.num_samples),
                      cfg.workers)
  timings = {}
  print(f"== vqkd demo in {os.path.abspath(workdir)}: {len(stages)} stages, "
        f"{len(cfg.row_order)} rows x {cfg.seeds} seed(s), {cfg.workers} at a time ==", flush=True)
  t = time.time()
  from vqkd_jax.data.pipeline import load_dataset
  data = cfg.shared.evaluator.data
  load_dataset(data.name, cfg.data_dir, data.image_size)
  timings["data"] = time.time() - t
  print(f"[data] built-in dataset ready in {timings['data']:.1f} s", flush=True)

  run_stages(stages, progress, cfg.workers, cache_dir, timings,
             _early_evaluations(cfg, rows_dirs, shared_dirs))

  print(progress.line(f"report: {num_rows} rows, {cfg.report.num_samples} samples per FD_eval",
                      len(stages)), flush=True)
  t = time.time()
  from vqkd_jax.evaluation import demo_report
  text = demo_report.write(cfg, workdir, rows_dirs, shared_dirs)
  timings["report"] = time.time() - t
  timings["total"] = time.time() - progress.start
  with open(os.path.join(workdir, "timings.json"), "w") as f:
    json.dump(timings, f, indent=2)
  print(text, flush=True)
  print(f"total {_clock(timings['total'])} (report {timings['report']:.0f} s); "
        f"everything is in {os.path.abspath(workdir)}", flush=True)
  return 0
