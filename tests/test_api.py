"""The sampling API (vqkd_jax/api.py): Generator.from_checkpoint from a demo-style directory or one
proposal stage's, for AR and NAR, its errors, and the `vqkd sample` / `vqkd bench sample` commands.

The default tests use the tiny pipeline of tests/tiny_workdir.py (one-step stages, built once per
session); the slow one runs the runlocal demo (and trains a NAR stage on its tokenizer if it has
none)."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

from tiny_workdir import runlocal_demo, tiny_pipeline, train_tiny_stage
from vqkd_jax import cli
from vqkd_jax.api import Generator, SamplingError, demo_rows, find_proposal, find_tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  return tiny_pipeline(tmp_path_factory)


@pytest.fixture(scope="module")
def nar_gen(tiny):
  return Generator.from_checkpoint(str(tiny), kind="nar")         # a demo-style directory


@pytest.fixture(scope="module")
def ar_gen(tiny):
  return Generator.from_checkpoint(str(tiny / "ar"))              # one stage's directory


def _saved_config(workdir):
  with open(os.path.join(workdir, "config.json")) as f:
    return json.load(f)


def _reference_nar_images(workdir, frozen, labels, seed, decode=True, **overrides):
  """Second path: load_nar + proposal.nar.sample with the settings read from the stage's saved
  config.json + the frozen tokenizer's code vectors through the pixel decoder (the tokenizer
  `frozen` passed in: a random-teacher Cluster tokenizer takes seconds to load)."""
  import jax.numpy as jnp

  from vqkd_jax.proposal import nar as nar_lib
  from vqkd_jax.train import nar as nar_stage
  from vqkd_jax.train import pixel_decoder as decoder_stage
  from vqkd_jax.train.common import to_uint8

  model, variables, info = nar_stage.load_nar(str(workdir / "nar"), tokenizer=frozen)
  s = _saved_config(workdir / "nar")["sampling"]
  kw = dict(steps=s["steps"], cfg_schedule=s["cfg_schedule"],
            choice_temperature=s["choice_temperature"])
  kw.update(overrides)
  codes = np.asarray(nar_lib.sample(model, variables["params"], np.asarray(labels),
                                    rng=jax.random.PRNGKey(seed), cfg_scale=1.75, temperature=1.0,
                                    **kw))
  if not decode:
    return codes, None
  decoder, dec_vars = decoder_stage.load_decoder(str(workdir / "pixel_decoder"))
  z = frozen.lookup(frozen.variables, jnp.asarray(codes.reshape(len(labels), *info["grid"])))
  return codes, np.asarray(jax.jit(lambda z: to_uint8(decoder.apply(dec_vars, z)))(z))


def test_from_checkpoint_of_a_demo_dir_and_of_a_stage_dir(tiny, ar_gen, nar_gen):
  assert find_proposal(str(tiny)) == (str(tiny / "ar"), "ar")      # both there: AR by default
  assert find_proposal(str(tiny), "nar") == (str(tiny / "nar"), "nar")
  assert ar_gen.kind == "ar" and nar_gen.kind == "nar"
  from_stage = Generator.from_checkpoint(str(tiny / "nar"))        # the stage's own directory
  assert from_stage.kind == "nar" and from_stage.grid == nar_gen.grid == ar_gen.grid == (8, 8)
  with pytest.raises(FileNotFoundError, match="does not exist"):   # the earlier name: an alias
    Generator.from_workdir(str(tiny / "nowhere"))
  labels = [0, 3, 11]
  for gen in (ar_gen, nar_gen, from_stage):
    tokens = gen.sample_tokens(labels, seed=1)
    assert tokens.shape == (3, 8, 8) and 0 <= tokens.min() and tokens.max() < 32
  images = ar_gen.sample(labels, seed=1)
  assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8
  # The NAR stage's steps / choice temperature come from its config; the images equal a second,
  # hand-wired path through the same stages.
  frozen = from_stage.tokenizer.frozen
  codes, images = _reference_nar_images(tiny, frozen, labels, seed=1)
  np.testing.assert_array_equal(from_stage.sample_tokens(labels, seed=1).reshape(3, -1), codes)
  got = from_stage.sample(labels, seed=1)
  assert got.shape == (3, 32, 32, 3) and got.dtype == np.uint8
  assert np.abs(got.astype(int) - images).max() <= 1                # float rounding at most
  codes, _ = _reference_nar_images(tiny, frozen, labels, seed=1, decode=False, steps=3,
                                   choice_temperature=1.0)
  np.testing.assert_array_equal(
      nar_gen.sample_tokens(labels, seed=1, steps=3, choice_temperature=1.0).reshape(3, -1), codes)


def test_multi_row_demo_directories(tiny, tmp_path):
  """configs/demo/demo.py's layout, <workdir>/<row>/<stage>: row picks one; default vqkd_clip."""
  demo = tmp_path / "demo"
  (demo / "shared").mkdir(parents=True)
  for row in ("vqgan", "vqkd_clip"):
    os.symlink(tiny, demo / row)
  assert demo_rows(str(demo)) == ["vqgan", "vqkd_clip"]
  assert find_proposal(str(demo)) == (str(demo / "vqkd_clip" / "ar"), "ar")
  assert find_proposal(str(demo), "nar", row="vqgan") == (str(demo / "vqgan" / "nar"), "nar")
  with pytest.raises(FileNotFoundError, match=r"no row 'fsq'.*vqgan, vqkd_clip"):
    find_proposal(str(demo), row="fsq")
  os.remove(demo / "vqkd_clip")
  assert find_proposal(str(demo))[0] == str(demo / "vqgan" / "ar")         # the only row
  os.symlink(tiny, demo / "fsq")
  with pytest.raises(FileNotFoundError, match="rows fsq, vqgan: pick one with row="):
    find_proposal(str(demo))


def test_from_checkpoint_after_the_runs_moved(tiny, nar_gen, tmp_path):
  """The proposal config's absolute tokenizer_workdir is gone: the sibling tokenizer/ is used."""
  moved = tmp_path / "moved"
  for stage in ("tokenizer", "pixel_decoder", "nar"):
    shutil.copytree(tiny / stage, moved / stage)
  cfg = _saved_config(moved / "nar")
  cfg["tokenizer_workdir"] = str(tmp_path / "old_place" / "tokenizer")
  (moved / "nar" / "config.json").write_text(json.dumps(cfg))
  assert find_tokenizer(str(moved / "nar")) == str(moved / "tokenizer")
  gen = Generator.from_checkpoint(str(moved))                     # only nar/ there: picked
  assert gen.kind == "nar"
  np.testing.assert_array_equal(gen.sample_tokens([1, 2], seed=5),
                                nar_gen.sample_tokens([1, 2], seed=5))
  assert gen.sample([1, 2], seed=5).shape == (2, 32, 32, 3)        # the sibling pixel_decoder/


def test_missing_pieces_name_the_command_that_makes_them(tiny, tmp_path, capsys):
  only_tok = tmp_path / "only_tokenizer"
  only_tok.mkdir()
  os.symlink(tiny / "tokenizer", only_tok / "tokenizer")
  with pytest.raises(FileNotFoundError, match=r"no proposal stage.*configs/demo/ar\.py"):
    Generator.from_checkpoint(str(only_tok))
  no_decoder = tmp_path / "no_decoder"
  no_decoder.mkdir()
  os.symlink(tiny / "ar", no_decoder / "ar")
  with pytest.raises(FileNotFoundError, match=r"has no nar/ stage.*configs/demo/nar\.py"):
    Generator.from_checkpoint(str(no_decoder), kind="nar")
  with pytest.raises(FileNotFoundError, match=r"pixel decoder.*configs/demo/pixel_decoder\.py"):
    Generator.from_checkpoint(str(no_decoder))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    Generator.from_checkpoint(str(tmp_path / "nowhere"))
  with pytest.raises(SamplingError, match="not a proposal network"):
    Generator.from_checkpoint(str(tiny / "tokenizer"))
  with pytest.raises(SamplingError, match="holds a nar stage, not ar"):
    Generator.from_checkpoint(str(tiny / "nar"), kind="ar")
  # The command prints one line and exits 2.
  assert cli.main(["sample", "--workdir", str(no_decoder), "--kind", "nar"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("vqkd: error:") and "configs/demo/nar.py" in err and "\n" not in err


def test_nar_samples_depend_on_seed_and_index_only(nar_gen):
  """As the AR test in tests/test_demo.py: batch size and padding do not change a sample."""
  labels = [0, 1, 2, 3, 4, 0, 7]
  whole = nar_gen.sample_tokens(labels, seed=3, batch_size=7)
  np.testing.assert_array_equal(nar_gen.sample_tokens(labels, seed=3, batch_size=2), whole)
  np.testing.assert_array_equal(nar_gen.sample_tokens(labels, seed=3, batch_size=4), whole)
  np.testing.assert_array_equal(nar_gen.sample_tokens(labels[:3], seed=3), whole[:3])
  assert (nar_gen.sample_tokens(labels, seed=4) != whole).mean() > 0.3
  assert (whole[0] != whole[5]).any()            # same label, another index: another stream


def test_settings_a_kind_does_not_use_raise(ar_gen, nar_gen):
  with pytest.raises(SamplingError, match="top_k and top_p"):
    nar_gen.sample([0], top_k=5)
  with pytest.raises(SamplingError, match="top_k and top_p"):
    nar_gen.sample([0], top_p=0.9)
  with pytest.raises(SamplingError, match="steps and choice_temperature"):
    ar_gen.sample([0], steps=4)
  with pytest.raises(SamplingError, match="labels must be in"):
    ar_gen.sample([12])


def test_sample_command_kind_nar_writes_a_png(tiny, tmp_path, capsys):
  out = tmp_path / "grid.png"
  assert cli.main(["sample", "--workdir", str(tiny), "--kind", "nar", "--labels", "0,3",
                   "--per_label", "3", "--steps", "2", "--out", str(out)]) == 0
  with Image.open(out) as im:                     # 2 rows x 3 columns of 32 px, 2 px padding
    assert im.format == "PNG" and im.size == (3 * 34 + 2, 2 * 34 + 2)
  assert "wrote 6 samples" in capsys.readouterr().out
  assert cli.main(["sample", "--workdir", str(tiny), "--kind", "nar", "--top_k", "5",
                   "--out", str(out)]) == 2
  assert "top_k and top_p" in capsys.readouterr().err


def test_bench_sample_follows_the_config_stage(capsys):
  rc = cli.main(["bench", "sample", "--config", "configs/demo/nar.py", "--steps", "1",
                 "--config.bench.batch_size=2", "--config.model.depth=1",
                 "--config.sampling.steps=2"])
  assert rc == 0
  out = capsys.readouterr().out
  assert "nar sampling" in out and "decoding_steps" in out
  # The AR demo config has no bench group: one line that says so.
  assert cli.main(["bench", "sample", "--config", "configs/demo/ar.py", "--steps", "1"]) == 2
  assert "bench" in capsys.readouterr().err


@pytest.mark.slow
def test_runlocal_demo_for_both_kinds(tmp_path_factory, tmp_path):
  """The runlocal demo (minutes: every row of configs/demo/demo.py), a NAR stage trained on its
  tokenizer if it has none (configs/demo/nar.py), then from_checkpoint for both kinds and
  `vqkd sample --kind nar`."""
  run = runlocal_demo(tmp_path_factory)
  pipeline = os.path.dirname(find_proposal(str(run))[0])         # the run, or its default row
  if not os.path.isdir(os.path.join(pipeline, "nar")):
    train_tiny_stage("nar", os.path.join(pipeline, "nar"), os.path.join(pipeline, "tokenizer"))
  ar = Generator.from_checkpoint(str(run))
  nar = Generator.from_checkpoint(str(run), kind="nar")
  assert (ar.kind, nar.kind) == ("ar", "nar") and nar.grid == ar.grid == (8, 8)
  for gen in (ar, nar):
    images = gen.sample([0, 5], seed=0)
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
  np.testing.assert_array_equal(nar.sample_tokens(list(range(5)), seed=2, batch_size=2),
                                nar.sample_tokens(list(range(5)), seed=2, batch_size=5))
  out = tmp_path / "nar.png"
  assert cli.main(["sample", "--workdir", str(run), "--kind", "nar", "--labels", "0,1",
                   "--per_label", "2", "--out", str(out)]) == 0
  assert out.stat().st_size > 0
