"""`vqkd demo`, the paper in a box: the stage plan, the verdict rules and the report's pieces against
independent references, and the demo itself end to end at `runlocal` size (two rows, shared
fixture; every row in a slow test): report rows and columns, verdicts, grids, reuse, the sampling
API and the `vqkd sample` command on a row."""

import json
import math
import os

import numpy as np
import pytest

from vqkd_jax import cli
from vqkd_jax.config import load_config, load_config_with_overrides
from vqkd_jax.evaluation import demo_report, pipeline_report, verdicts

FAST_ROWS = "('vqgan','vqkd_clip')"
MAIN_KEYS = ("codebook_usage", "rfd_eval", "ppl", "fd_ar", "fd_nar")


def _demo(root, *extra):
  return cli.main(["demo", "--workdir", str(root / "run"), "--config",
                   "configs/demo/demo.py:runlocal", f"--config.data_dir={root / 'data'}",
                   *extra])


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
  """The runlocal demo on the VQGAN and VQ-KD_CLIP rows: every stage kind (the CLIP-style
  teacher, perceptual network, evaluator, VQGAN, VQ-KD, pixel decoder, AR, NAR, T2I), two stages
  at a time in worker processes."""
  root = tmp_path_factory.mktemp("demo")
  assert _demo(root, f"--config.row_order={FAST_ROWS}") == 0
  return root


# ----------------------------------------------------------------------------------------------
# The plan: directories, cross references, seeds.

def test_plan_layout_and_dependencies(tmp_path):
  from vqkd_jax.demo import plan

  cfg = load_config_with_overrides("configs/demo/demo.py:seeds=2", [])
  stages, rows_dirs, shared_dirs = plan(cfg, str(tmp_path))
  by_name = {s.name: s for s in stages}
  w = str(tmp_path)
  # Every row of the paper's tables, plus Cluster; T2I on VQGAN and VQ-KD_CLIP.
  assert list(rows_dirs[0]) == ["vqgan", "fsq", "vqkd_clip", "vqkd_vit", "vqkd_dino", "vqkd_mae",
                                "cluster"]
  assert set(rows_dirs[0]["vqgan"]) == {"tokenizer", "ar", "nar", "t2i"}
  assert set(rows_dirs[0]["vqkd_mae"]) == {"tokenizer", "pixel_decoder", "ar", "nar"}
  assert rows_dirs[0]["vqkd_clip"]["ar"] == f"{w}/vqkd_clip/ar"
  assert rows_dirs[1]["vqkd_clip"]["ar"] == f"{w}/seed1/vqkd_clip/ar"
  # The evaluator is trained once and shared by the seeds; everything else repeats.
  assert [s.name for s in stages].count("shared/evaluator") == 1
  assert shared_dirs[1]["evaluator"] == shared_dirs[0]["evaluator"] == f"{w}/shared/evaluator"
  assert shared_dirs[1]["teacher_clip"] == f"{w}/seed1/shared/teacher_clip"
  assert len(stages) == 1 + 2 * (len(stages) - 1) // 2
  # Different seeds for every stage of the second repeat.
  assert by_name["seed1/vqkd_mae/nar"].config.seed == by_name["vqkd_mae/nar"].config.seed + 1
  # Cross references and the dependency order.
  tok = by_name["vqkd_mae/tokenizer"].config
  assert tok.teacher.kind == "in_the_box_mae" and tok.teacher.workdir == f"{w}/shared/teacher_mae"
  cl = by_name["cluster/tokenizer"].config
  assert cl.teacher.kind == "in_the_box_clip"
  assert by_name["cluster/pixel_decoder"].config.model.code_dim == (
      cfg.shared.teacher_clip.model.embed_dim)
  t2i = by_name["vqkd_clip/t2i"].config
  assert t2i.text_encoder.workdir == f"{w}/shared/teacher_clip"
  assert t2i.pixel_decoder_workdir == f"{w}/vqkd_clip/pixel_decoder"
  assert set(by_name["vqkd_clip/t2i"].needs) == {
      f"{w}/vqkd_clip/tokenizer", f"{w}/vqkd_clip/pixel_decoder", f"{w}/shared/teacher_clip"}
  assert set(by_name["vqgan/tokenizer"].needs) == {f"{w}/shared/perceptual"}
  position = {s.workdir: i for i, s in enumerate(stages)}
  for s in stages:
    assert all(position[d] < position[s.workdir] for d in s.needs), s.name


def test_plan_builds_only_the_shared_stages_the_rows_need(tmp_path):
  from vqkd_jax.demo import plan

  cfg = load_config_with_overrides("configs/demo/demo.py", ["row_order=('vqkd_mae',)"])
  stages, _, _ = plan(cfg, str(tmp_path))
  assert [s.name for s in stages] == [
      "shared/perceptual", "shared/teacher_mae", "shared/evaluator", "vqkd_mae/tokenizer",
      "vqkd_mae/pixel_decoder", "vqkd_mae/ar", "vqkd_mae/nar"]


def test_size_variants():
  default = load_config("configs/demo/demo.py")
  gpu = load_config("configs/demo/demo.py:gpu")
  assert default.workers == 2 and gpu.workers == 1
  assert default.rows.vqgan.ar.data.image_size == 32 and gpu.rows.vqgan.ar.data.image_size == 64
  for key in default.row_order:
    for stage in ("tokenizer", "ar", "nar"):
      assert gpu.rows[key][stage].total_steps > default.rows[key][stage].total_steps
  # Warm-up and the GAN start scale with the steps.
  pd = default.rows.vqkd_clip.pixel_decoder
  assert 0 < pd.gan.start < pd.total_steps
  assert default.rows.vqgan.ar.optimizer.warmup_steps < default.rows.vqgan.ar.total_steps
  assert load_config("configs/demo/demo.py:seeds=3").seeds == 3


def test_gpu_smoke_variant_finds_its_built_in_datasets():
  """`:gpu,runlocal=True` (every stage of the GPU study for 2 steps: the quick check of a GPU
  machine) reads the small 64 px built-in config; it failed before that config existed."""
  from vqkd_jax.data.shapes_builder import VqkdShapes, config_name

  cfg = load_config("configs/demo/demo.py:gpu,runlocal=True")
  stages = list(cfg.shared.values()) + [
      r[kind] for r in cfg.rows.values()
      for kind in ("tokenizer", "pixel_decoder", "ar", "nar", "t2i") if kind in r]
  names = {config_name(c.data.image_size, small=c.data.name == "shapes_small") for c in stages}
  assert names == {"64_small"}
  small = {c.name: c for c in VqkdShapes.BUILDER_CONFIGS}["64_small"]
  assert (small.image_size, small.num_train, small.num_validation) == (64, 2_000, 500)


# ----------------------------------------------------------------------------------------------
# The rules and the report's pieces against independent references.

def _rows(fd_vqkd, fd_vqgan, fd_fsq, usage_fsq=100.0, probes=None):
  rows = [dict(tokenizer="VQGAN", fd_ar=fd_vqgan, fd_nar=fd_vqgan, codebook_usage=60.0),
          dict(tokenizer="FSQ", fd_ar=fd_fsq, fd_nar=fd_fsq, codebook_usage=usage_fsq),
          dict(tokenizer="VQ-KD_CLIP", fd_ar=fd_vqkd, fd_nar=fd_vqkd, codebook_usage=99.0)]
  for r, p in zip(rows, probes or [None] * 3):
    r["code_probe_accuracy"] = p
  return rows


def test_observation_1_and_2_rules():
  v = verdicts.verdicts(_rows(fd_vqkd=10.0, fd_vqgan=20.0, fd_fsq=30.0))
  assert [x["verdict"] for x in v[:2]] == [verdicts.HOLDS, verdicts.HOLDS]
  v = verdicts.verdicts(_rows(fd_vqkd=30.0, fd_vqgan=20.0, fd_fsq=28.0))
  assert [x["verdict"] for x in v[:2]] == [verdicts.DOES_NOT_HOLD, verdicts.DOES_NOT_HOLD]
  # Within the 10% margin: not better.
  assert verdicts.verdicts(_rows(9.5, 10.0, 30.0))[0]["verdict"] == verdicts.DOES_NOT_HOLD
  # Better with AR only: inconclusive.
  rows = _rows(10.0, 20.0, 30.0)
  rows[2]["fd_nar"] = 25.0
  assert verdicts.verdicts(rows)[0]["verdict"] == verdicts.INCONCLUSIVE
  # FSQ not using its codebook: the control fails.
  v = verdicts.verdicts(_rows(10.0, 20.0, 30.0, usage_fsq=40.0))
  assert v[1]["verdict"] == verdicts.INCONCLUSIVE and "usage" in v[1]["evidence"]
  for x in v:
    assert x["rule"] and x["observation"] in verdicts.OBSERVATIONS


def test_spearman_against_scipy_and_exact_p_values():
  stats = pytest.importorskip("scipy.stats")
  rng = np.random.default_rng(0)
  for _ in range(5):
    x, y = rng.normal(size=7), rng.normal(size=7)
    y[2] = y[5]  # a tie
    assert math.isclose(verdicts.spearman(x, y), stats.spearmanr(x, y).statistic, abs_tol=1e-12)
  # Perfectly reversed order of 5: only 1 of the 120 orderings is as negative.
  assert math.isclose(verdicts.spearman_p_negative([1, 2, 3, 4, 5], [5, 4, 3, 2, 1]), 1 / 120)
  assert verdicts.spearman_p_negative([1, 2, 3, 4, 5], [1, 2, 3, 4, 5]) == 1.0
  # The exact p-value by enumerating orderings with scipy's correlation (a second path).
  import itertools
  x, y = [.1, .3, .2, .5, .4, .7], [60., 50., 40., 30., 10., 20.]
  rho = stats.spearmanr(x, y).statistic
  perms = list(itertools.permutations(y))
  expected = sum(stats.spearmanr(x, p).statistic <= rho + 1e-12 for p in perms) / len(perms)
  assert math.isclose(verdicts.spearman_p_negative(x, y), expected)


def test_observation_3_rule():
  fds = [50.0, 40.0, 30.0, 20.0, 10.0]
  make = lambda probes: [dict(tokenizer=f"T{i}", fd_ar=f, fd_nar=f, code_probe_accuracy=p)
                         for i, (f, p) in enumerate(zip(fds, probes))]
  assert verdicts.observation_3({r["tokenizer"]: r for r in make([.1, .2, .3, .4, .5])})[
      "verdict"] == verdicts.HOLDS
  assert verdicts.observation_3({r["tokenizer"]: r for r in make([.5, .4, .3, .2, .1])})[
      "verdict"] == verdicts.DOES_NOT_HOLD
  # rho = -0.8 but not significant with 5 rows (exact p = 8/120): inconclusive.
  assert verdicts.observation_3({r["tokenizer"]: r for r in make([.1, .3, .2, .5, .4])})[
      "verdict"] == verdicts.INCONCLUSIVE


def test_combine_over_seeds():
  a = [{"observation": "o", "verdict": verdicts.HOLDS, "rule": "r"}]
  b = [{"observation": "o", "verdict": verdicts.INCONCLUSIVE, "rule": "r"}]
  assert verdicts.combine([a, a, a])[0]["verdict"] == verdicts.HOLDS
  out = verdicts.combine([a, b, a])[0]
  assert out["verdict"] == verdicts.INCONCLUSIVE and out["per_seed"] == [
      verdicts.HOLDS, verdicts.INCONCLUSIVE, verdicts.HOLDS]


def test_bag_of_codes_and_ridge_probe():
  idx = np.array([[[0, 1], [1, 3]]])
  np.testing.assert_allclose(pipeline_report.bag_of_codes(idx, 4), [[0.25, 0.5, 0.0, 0.25]])
  rng = np.random.default_rng(0)
  x = rng.normal(size=(300, 6))
  y = (x[:, 0] > 0).astype(int) + 2 * (x[:, 1] > 0).astype(int)
  # The same ridge solution by least squares on the penalty-augmented system (a second path).
  mean, std = x.mean(0), x.std(0)
  a = np.concatenate([(x - mean) / std, np.ones((300, 1))], 1)
  penalty = np.sqrt(pipeline_report.RIDGE) * np.eye(7)[:6]
  w = np.linalg.lstsq(np.concatenate([a, penalty]),
                      np.concatenate([np.eye(4)[y], np.zeros((6, 4))]), rcond=None)[0]
  expected = np.mean(np.argmax(a @ w, -1) == y)
  assert pipeline_report.ridge_probe(x, y, x, y, 4) == pytest.approx(expected)
  assert expected > 0.8


def test_main_table_cells_beside_the_paper():
  rows = [dict(tokenizer="VQGAN", codebook_usage=50.0, rfd_eval=3.0, ppl=100.0, fd_ar=20.0,
               fd_nar=21.0, fd_t2i=None),
          dict(tokenizer="Cluster_CLIP", codebook_usage=90.0, rfd_eval=4.0, ppl=80.0, fd_ar=10.0,
               fd_nar=11.0)]
  cells, cols = demo_report.main_cells(rows, t2i_missing=True)
  assert cells[0]["codebook_usage"] == "50.0 (4.9)" and cells[0]["fd_ar"] == "20.00 (24.11)"
  assert cells[0]["fd_t2i"] == "n/a (stage missing) (24.11)"
  assert cells[1]["ppl"] == "80.00"   # no paper row for Cluster
  assert [c[0] for c in cols] == ["tokenizer", *[k for k, *_ in demo_report.MAIN_COLUMNS]]
  mean, spread = demo_report._aggregate([[dict(tokenizer="A", ppl=1.0)],
                                         [dict(tokenizer="A", ppl=3.0)]])
  assert mean[0]["ppl"] == 2.0 and spread["A"]["ppl"] == pytest.approx(math.sqrt(2))


# ----------------------------------------------------------------------------------------------
# The demo end to end (runlocal).

def _check_report(run, labels):
  report = json.loads((run / "report.json").read_text())
  rows = {r["tokenizer"]: r for r in report["rows"]}
  assert list(rows) == labels
  headers = [c["header"] for c in report["columns"]]
  for h in ("Codebook usage", "rFD_eval", "PPL", "FD_eval AR", "FD_eval NAR", "FD_eval T2I"):
    assert any(h in x for x in headers), h
  for label, row in rows.items():
    for key in MAIN_KEYS + ("psnr", "code_probe_accuracy", "ar_accuracy", "nar_accuracy"):
      assert np.isfinite(row[key]), (label, key)
    assert 0 < row["codebook_usage"] <= 100
    assert 1 < row["ppl"] < 2 * row["num_codes"]
  md = (run / "report.md").read_text()
  assert "not FID" in md
  assert len(report["verdicts"]) == 3
  for v in report["verdicts"]:
    assert v["verdict"] in (verdicts.HOLDS, verdicts.DOES_NOT_HOLD, verdicts.INCONCLUSIVE)
    assert f"**{v['verdict']}**" in md and v["rule"] in md
  for f in ("reconstructions.png", "samples_ar.png", "samples_nar.png", "codebook.png",
            "plot.png"):
    assert (run / f).stat().st_size > 0, f
  return rows, md


def test_demo_writes_report_grids_and_verdicts(demo_dir):
  run = demo_dir / "run"
  rows, md = _check_report(run, ["VQGAN", "VQ-KD_CLIP"])
  for label in rows:
    assert np.isfinite(rows[label]["fd_t2i"])
  assert "(24.11)" in md   # the paper's numbers beside ours
  assert (run / "samples_t2i.png").stat().st_size > 0
  for row in ("vqgan", "vqkd_clip"):
    for f in ("reconstructions.png", "ar.png", "nar.png", "t2i.png"):
      assert (run / row / "grids" / f).stat().st_size > 0
  for stage in ("shared/teacher_clip", "shared/perceptual", "shared/evaluator",
                "vqgan/tokenizer", "vqkd_clip/pixel_decoder", "vqkd_clip/nar", "vqgan/t2i"):
    lines = (run / stage / "metrics.jsonl").read_text().splitlines()
    assert lines and "loss" in json.loads(lines[0]), stage
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(run / stage / "tensorboard"))
  timings = json.loads((run / "timings.json").read_text())
  assert timings["total"] > 0 and "vqkd_clip/t2i" in timings
  # The rows were evaluated in the stage pool (beside the stages) and the report used those
  # evaluations: each row's cached seconds are the early evaluation's.
  for row in ("vqgan", "vqkd_clip"):
    cached = json.loads((run / row / "report_row.json").read_text())["row"]
    assert timings[f"report/{row}"] == pytest.approx(cached["seconds"]) and cached["seconds"] > 0


def test_demo_reuses_finished_stages(demo_dir, capsys):
  from vqkd_jax.demo import CODE_FINGERPRINT_FILE, code_fingerprint

  before = (demo_dir / "run" / "vqgan" / "report_row.json").stat().st_mtime
  # Every trained stage recorded the code it was trained with; one is made to look older.
  fingerprint = demo_dir / "run" / "vqgan" / "nar" / CODE_FINGERPRINT_FILE
  assert fingerprint.read_text().strip() == code_fingerprint()
  fingerprint.write_text("0123456789ab\n")
  try:
    assert _demo(demo_dir, f"--config.row_order={FAST_ROWS}") == 0
  finally:   # The module's demo directory is shared by the tests after this one.
    fingerprint.write_text(code_fingerprint() + "\n")
  out = capsys.readouterr().out
  # 3 shared (CLIP-style teacher, perceptual, evaluator) + VQGAN's tokenizer, AR, NAR, T2I +
  # VQ-KD_CLIP's tokenizer, pixel decoder, AR, NAR, T2I: every stage is reused, none retrained.
  assert out.count("finished earlier, reusing") == 3 + 4 + 5
  assert "done in" not in out
  stale = [line for line in out.splitlines() if "trained by other code" in line]
  assert len(stale) == 1 and "vqgan/nar" in stale[0] and "0123456789ab" in stale[0]
  # The rows' metrics come from their caches (not recomputed).
  assert (demo_dir / "run" / "vqgan" / "report_row.json").stat().st_mtime == before


def test_demo_refuses_to_overwrite_a_different_config(demo_dir):
  with pytest.raises(ValueError, match="different config"):
    _demo(demo_dir, f"--config.row_order={FAST_ROWS}", "--config.rows.vqgan.ar.optimizer.lr=0.5")


def test_generator_api_and_sample_command_on_a_row(demo_dir, tmp_path):
  from vqkd_jax.api import Generator

  gen = Generator.from_checkpoint(str(demo_dir / "run" / "vqkd_clip"))
  labels = [0, 1, 2, 3, 4]
  images = gen.sample(labels, seed=3, batch_size=2)
  assert images.shape == (5, 32, 32, 3) and images.dtype == np.uint8
  # A sample depends on the seed and its index, not on how the labels were batched.
  tokens_a = gen.sample_tokens(labels, seed=3, batch_size=2)
  tokens_b = gen.sample_tokens(labels, seed=3, batch_size=5)
  np.testing.assert_array_equal(tokens_a, tokens_b)
  assert not np.array_equal(tokens_a, gen.sample_tokens(labels, seed=4))
  out = tmp_path / "grid.png"
  assert cli.main(["sample", "--workdir", str(demo_dir / "run" / "vqgan"), "--labels", "0,5",
                   "--per_label", "3", "--out", str(out)]) == 0
  assert out.stat().st_size > 0


@pytest.mark.slow  # 70 s in CI; `make test-slow`
def test_pretokenize_then_train_ar_from_tokens(demo_dir, tmp_path):
  """Codes written by `vqkd data pretokenize` equal the tokenizer's codes of each view (a second
  path: the Tokenizer API on the views made here), and the AR stage trains from them."""
  from PIL import Image

  from vqkd_jax.api import Tokenizer
  from vqkd_jax.data.pipeline import load_dataset
  from vqkd_jax.data.pretokenize import TokenSource, make_token_iterator
  from vqkd_jax.train import loop

  tokenizer_dir, out = demo_dir / "run" / "vqkd_clip" / "tokenizer", tmp_path / "tokens"
  rc = cli.main(["data", "pretokenize", "--tokenizer", str(tokenizer_dir), "--out", str(out),
                 "--data", "shapes_small", "--data_dir", str(demo_dir / "data"), "--crops", "5",
                 "--batch_size", "64"])
  assert rc == 0
  source = TokenSource(str(out))
  splits, _ = load_dataset("shapes_small", str(demo_dir / "data"), 32)
  assert len(source) == len(splits["train"]) and source.metadata["views"] == 10
  tok = Tokenizer(str(tokenizer_dir))
  for i in (0, len(source) - 1):
    image = np.asarray(splits["train"][i]["image"])                      # 32 x 32 already
    big = np.asarray(Image.fromarray(image).resize((35, 35), resample=3))  # 1.1 x 32, bicubic
    crops = [big[:32, :32], big[:32, 3:], big[3:, :32], big[3:, 3:], big[2:34, 2:34]]  # torchvision CenterCrop: round(1.5) = 2
    expected = tok.encode(np.stack(crops + [c[:, ::-1] for c in crops])).reshape(10, -1)
    rec = source[i]
    np.testing.assert_array_equal(np.asarray(rec["tokens"]), expected)
    assert rec["label"] == int(splits["train"][i]["label"])
  batch = next(make_token_iterator(str(out), global_batch_size=8))
  assert batch["tokens"].shape == (8, 64) and batch["tokens"].dtype == np.int32

  c = load_config("configs/demo/ar.py:runlocal")
  with c.unlocked():
    c.tokenizer_workdir = str(tokenizer_dir)
    c.data.tokens_dir = str(out)
    c.data.data_dir = str(demo_dir / "data")
    c.total_steps, c.eval_every, c.checkpoint_every = 2, 0, 2
  result = loop.train(c, str(tmp_path / "ar"))
  assert result.steps_run == 2 and np.isfinite(result.history[-1]["loss"])


@pytest.mark.slow
def test_demo_every_row(tmp_path):
  """The whole runlocal demo: every row of the paper's tables and Cluster, each with its stages."""
  assert _demo(tmp_path) == 0
  rows, _ = _check_report(tmp_path / "run", ["VQGAN", "FSQ", "VQ-KD_CLIP", "VQ-KD_ViT",
                                             "VQ-KD_DINO", "VQ-KD_MAE", "Cluster_CLIP"])
  assert np.isfinite(rows["VQGAN"]["fd_t2i"]) and np.isfinite(rows["VQ-KD_CLIP"]["fd_t2i"])
  assert "fd_t2i" not in rows["FSQ"]
