"""The walking skeleton end to end at `runlocal` size: every stage, the report, stage reuse, the
sampling API and the `vqkd sample` command."""

import json
import os

import numpy as np
import pytest

from vqkd_jax import cli


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("demo")
  rc = cli.main(["demo", "--workdir", str(root / "run"), "--config",
                 "configs/demo/demo.py:runlocal", f"--config.data_dir={root / 'data'}"])
  assert rc == 0
  return root


def test_demo_writes_report_and_grids(demo_dir):
  run = demo_dir / "run"
  report = json.loads((run / "report.json").read_text())
  row = report["rows"][0]
  for key in ("codebook_usage", "psnr", "ppl", "fd_eval", "sample_accuracy"):
    assert np.isfinite(row[key]), key
  assert 0 < row["codebook_usage"] <= 100
  # The AR prior's perplexity cannot exceed the codebook size by much after training, and is > 1.
  assert 1 < row["ppl"] < 2 * 256
  assert "not FID" in (run / "report.md").read_text()
  for f in ("reconstructions.png", "samples.png"):
    assert (run / f).stat().st_size > 0
  for stage in ("teacher", "evaluator", "tokenizer", "pixel_decoder", "ar"):
    lines = (run / stage / "metrics.jsonl").read_text().splitlines()
    assert lines and "loss" in json.loads(lines[0])
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(run / stage / "tensorboard"))


def test_demo_reuses_finished_stages(demo_dir, capsys):
  rc = cli.main(["demo", "--workdir", str(demo_dir / "run"), "--config",
                 "configs/demo/demo.py:runlocal", f"--config.data_dir={demo_dir / 'data'}"])
  assert rc == 0
  out = capsys.readouterr().out
  assert out.count("finished earlier, reusing") == 5


def test_demo_refuses_to_overwrite_a_different_config(demo_dir):
  with pytest.raises(ValueError, match="different config"):
    cli.main(["demo", "--workdir", str(demo_dir / "run"), "--config",
              "configs/demo/demo.py:runlocal", f"--config.data_dir={demo_dir / 'data'}",
              "--config.teacher.optimizer.lr=0.5"])


def test_generator_api_and_sample_command(demo_dir, tmp_path):
  from vqkd_jax.api import Generator

  gen = Generator.from_workdir(str(demo_dir / "run"))
  labels = [0, 1, 2, 3, 4]
  images = gen.sample(labels, seed=3, batch_size=2)
  assert images.shape == (5, 32, 32, 3) and images.dtype == np.uint8
  # A sample depends on the seed and its index, not on how the labels were batched.
  tokens_a = gen.sample_tokens(labels, seed=3, batch_size=2)
  tokens_b = gen.sample_tokens(labels, seed=3, batch_size=5)
  np.testing.assert_array_equal(tokens_a, tokens_b)
  assert not np.array_equal(tokens_a, gen.sample_tokens(labels, seed=4))
  out = tmp_path / "grid.png"
  assert cli.main(["sample", "--workdir", str(demo_dir / "run"), "--labels", "0,5",
                   "--per_label", "3", "--out", str(out)]) == 0
  assert out.stat().st_size > 0
