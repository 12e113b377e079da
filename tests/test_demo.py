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


def test_pretokenize_then_train_ar_from_tokens(demo_dir, tmp_path):
  """Codes written by `vqkd data pretokenize` equal the tokenizer's codes of each view (a second
  path: the Tokenizer API on the views made here), and the AR stage trains from them."""
  import numpy as np

  from vqkd_jax.api import Tokenizer
  from vqkd_jax.config import load_config
  from vqkd_jax.data.pipeline import load_dataset
  from vqkd_jax.data.pretokenize import TokenSource, make_token_iterator
  from vqkd_jax.train import loop

  run, out = demo_dir / "run", tmp_path / "tokens"
  rc = cli.main(["data", "pretokenize", "--tokenizer", str(run / "tokenizer"), "--out", str(out),
                 "--data", "shapes_small", "--data_dir", str(demo_dir / "data"), "--crops", "5",
                 "--batch_size", "64"])
  assert rc == 0
  source = TokenSource(str(out))
  splits, _ = load_dataset("shapes_small", str(demo_dir / "data"), 32)
  assert len(source) == len(splits["train"]) and source.metadata["views"] == 10
  tok = Tokenizer(str(run / "tokenizer"))
  for i in (0, len(source) - 1):
    image = np.asarray(splits["train"][i]["image"])                      # 32 x 32 already
    big = np.asarray(__import__("PIL.Image", fromlist=["Image"]).fromarray(image).resize(
        (35, 35), resample=3))                                           # 1.1 x 32, bicubic
    crops = [big[:32, :32], big[:32, 3:], big[3:, :32], big[3:, 3:], big[2:34, 2:34]]  # torchvision CenterCrop: round(1.5) = 2
    expected = tok.encode(np.stack(crops + [c[:, ::-1] for c in crops])).reshape(10, -1)
    rec = source[i]
    np.testing.assert_array_equal(np.asarray(rec["tokens"]), expected)
    assert rec["label"] == int(splits["train"][i]["label"])
  batch = next(make_token_iterator(str(out), global_batch_size=8))
  assert batch["tokens"].shape == (8, 64) and batch["tokens"].dtype == np.int32

  c = load_config("configs/demo/ar.py:runlocal")
  with c.unlocked():
    c.tokenizer_workdir = str(run / "tokenizer")
    c.data.tokens_dir = str(out)
    c.data.data_dir = str(demo_dir / "data")
    c.total_steps, c.eval_every, c.checkpoint_every = 2, 0, 2
  result = loop.train(c, str(tmp_path / "ar"))
  assert result.steps_run == 2 and np.isfinite(result.history[-1]["loss"])
