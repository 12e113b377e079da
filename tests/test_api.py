"""The sampling API (vqkd_jax/api.py): Generator.from_checkpoint from a demo-style directory or one
proposal stage's, for AR, NAR and T2I (text prompts), its errors, and the `vqkd sample` /
`vqkd bench sample` commands.

The default tests use the tiny pipeline of tests/tiny_workdir.py (one-step stages, built once per
session) and its tiny T2I layout; the slow one runs the runlocal demo (and trains a NAR stage on
its tokenizer if it has none)."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

from tiny_workdir import runlocal_demo, tiny_pipeline, tiny_t2i, train_tiny_stage
from vqkd_jax import cli
from vqkd_jax.api import (Generator, SamplingError, demo_rows, find_proposal, find_text_encoder,
                          find_tokenizer)


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
  assert "decoding_steps" in out
  # One row with the config's guidance, one without (the MaskGIT decoder's setting).
  rows = [line for line in out.splitlines() if "| nar sampling" in line]
  assert len(rows) == 2 and "| off " in rows[1] and "| off " not in rows[0]
  # The AR demo config has no bench group: one line that says so.
  assert cli.main(["bench", "sample", "--config", "configs/demo/ar.py", "--steps", "1"]) == 2
  assert "bench" in capsys.readouterr().err


# ------------------------------------------------------------------------------ text-to-image

PROMPTS = ["a red circle at the top left", "a blue square", "a large green triangle in the centre",
           "a small cross at the bottom right", "a red circle at the top left"]


@pytest.fixture(scope="module")
def t2i_root(tmp_path_factory):
  return tiny_t2i(tmp_path_factory)


@pytest.fixture(scope="module")
def t2i_gen(t2i_root):
  return Generator.from_checkpoint(str(t2i_root), kind="t2i")      # a multi-row demo directory


def test_t2i_from_checkpoint_and_prompts_give_images(t2i_root, t2i_gen):
  row = t2i_root / "vqkd_clip"
  assert find_proposal(str(t2i_root), "t2i") == (str(row / "t2i"), "t2i")
  assert find_proposal(str(row)) == (str(row / "t2i"), "t2i")      # the only proposal there
  assert find_proposal(str(row / "t2i")) == (str(row / "t2i"), "t2i")
  assert find_text_encoder(str(row / "t2i")) == str(t2i_root / "shared" / "teacher_clip")
  assert t2i_gen.kind == "t2i" and t2i_gen.grid == (8, 8) and t2i_gen.num_classes is None
  assert t2i_gen.text_encoder.kind == "in_the_box" and t2i_gen.codebook_size == 32
  images = t2i_gen.sample(PROMPTS[:3], seed=0)
  assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8
  # The stage's own directory, the prompts= keyword, one string: the same samples.
  from_stage = Generator.from_checkpoint(str(row / "t2i"), tokenizer=str(row / "tokenizer"))
  tokens = t2i_gen.sample_tokens(PROMPTS[:3], seed=0)
  assert tokens.shape == (3, 8, 8) and 0 <= tokens.min() and tokens.max() < 32
  np.testing.assert_array_equal(from_stage.sample_tokens(prompts=PROMPTS[:3], seed=0), tokens)
  np.testing.assert_array_equal(t2i_gen.sample_tokens(PROMPTS[0], seed=0), tokens[:1])
  assert t2i_gen.sample_tokens([], seed=0).shape == (0, 8, 8)


def test_t2i_samples_depend_on_seed_and_index_only(t2i_gen):
  whole = t2i_gen.sample_tokens(PROMPTS, seed=3, batch_size=5)
  np.testing.assert_array_equal(t2i_gen.sample_tokens(PROMPTS, seed=3, batch_size=2), whole)
  np.testing.assert_array_equal(t2i_gen.sample_tokens(PROMPTS, seed=3, batch_size=3), whole)
  np.testing.assert_array_equal(t2i_gen.sample_tokens(PROMPTS[:2], seed=3), whole[:2])
  assert (t2i_gen.sample_tokens(PROMPTS, seed=4) != whole).mean() > 0.3
  assert (whole[0] != whole[4]).any()            # same prompt, another index: another stream


def test_t2i_tokens_equal_the_lower_level_sampler(t2i_root, t2i_gen):
  """Second path: load_t2i + the caption tokenizer + train.t2i.sample_images on all prompts in one
  call; third: the prefix through the model by hand and the uncached full-recompute sampler."""
  import jax.numpy as jnp

  from vqkd_jax.proposal import sampling
  from vqkd_jax.train.t2i import load_t2i, sample_images

  model, variables, info = load_t2i(str(t2i_root / "vqkd_clip" / "t2i"),
                                    tokenizer=t2i_gen.tokenizer.frozen)
  enc = info["text_encoder"]
  ids, mask = enc.tokenize(PROMPTS)
  kw = dict(cfg_scale=2.0, temperature=1.3, top_k=12, top_p=0.9)
  want = np.asarray(sample_images(model, variables, enc, enc.variables, ids, mask,
                                  rng=jax.random.PRNGKey(7), **kw))
  got = t2i_gen.sample_tokens(PROMPTS, seed=7, batch_size=2, **kw)
  np.testing.assert_array_equal(got.reshape(len(PROMPTS), -1), want)
  states = enc.encode(enc.variables, jnp.asarray(ids[:2]), jnp.asarray(mask[:2]))
  prefix = model.apply(variables, states, jnp.asarray(mask[:2]), method="prefix")
  null = model.apply(variables, method="unconditional_prefix")
  full = sampling.sample_from_prefix_full_recompute(
      model.transformer, variables["params"]["transformer"], prefix, uncond_prefix=null,
      num_image_tokens=64, codebook_size=32, rng=jax.random.PRNGKey(7), **kw)
  np.testing.assert_array_equal(np.asarray(full), want[:2])
  # Images: the codes through the pixel decoder, as Tokenizer.decode of the tokens.
  np.testing.assert_array_equal(t2i_gen.sample(PROMPTS[:2], seed=7, **kw),
                                t2i_gen.tokenizer.decode(got[:2]))


def test_t2i_wrong_inputs_raise(t2i_gen, ar_gen, nar_gen):
  with pytest.raises(SamplingError, match=r"text prompts \(a list of str\), got int 0"):
    t2i_gen.sample([0, 1])
  with pytest.raises(SamplingError, match="ar generator samples from class labels.*t2i"):
    ar_gen.sample(["a red circle"])
  with pytest.raises(SamplingError, match="nar generator samples from class labels.*t2i"):
    nar_gen.sample("a red circle")
  with pytest.raises(SamplingError, match="prompts= needs a t2i generator"):
    ar_gen.sample(prompts=["a red circle"])
  with pytest.raises(SamplingError, match="labels or prompts=, not both"):
    t2i_gen.sample(["a blue square"], prompts=["a blue square"])
  with pytest.raises(SamplingError, match=r"does not know the words 'purple' \(prompt 1\), "
                     r"'hexagon' \(prompt 1, 2\); it knows: a small large red"):
    t2i_gen.sample(["a red circle", "a purple hexagon", "a hexagon"])
  with pytest.raises(SamplingError, match="longer than 11"):
    t2i_gen.sample([" ".join(["a"] * 12)])
  with pytest.raises(SamplingError, match="steps and choice_temperature"):
    t2i_gen.sample(["a blue square"], steps=4)
  with pytest.raises(SamplingError, match="class labels must be ints"):
    ar_gen.sample([0.5])


def test_t2i_text_encoder_found_after_the_runs_moved(t2i_root, t2i_gen, tmp_path):
  """The t2i config's absolute tokenizer, pixel decoder and teacher_clip paths are gone: the row's
  siblings and the demo layout's shared/teacher_clip are used."""
  moved = tmp_path / "moved"
  (moved / "shared").mkdir(parents=True)
  os.symlink(t2i_root / "shared" / "teacher_clip", moved / "shared" / "teacher_clip")
  row = moved / "vqkd_clip"
  row.mkdir()
  for stage in ("tokenizer", "pixel_decoder"):
    os.symlink(t2i_root / "vqkd_clip" / stage, row / stage)
  shutil.copytree(t2i_root / "vqkd_clip" / "t2i", row / "t2i")
  cfg = _saved_config(row / "t2i")
  old = str(tmp_path / "old_place")
  cfg["tokenizer_workdir"] = old + "/tokenizer"
  cfg["pixel_decoder_workdir"] = old + "/pixel_decoder"
  cfg["text_encoder"]["workdir"] = old + "/shared/teacher_clip"
  (row / "t2i" / "config.json").write_text(json.dumps(cfg))
  assert find_text_encoder(str(row / "t2i")) == str(moved / "shared" / "teacher_clip")
  gen = Generator.from_checkpoint(str(row))
  np.testing.assert_array_equal(gen.sample_tokens(PROMPTS[:2], seed=5),
                                t2i_gen.sample_tokens(PROMPTS[:2], seed=5))
  assert gen.sample(PROMPTS[:1]).shape == (1, 32, 32, 3)
  os.remove(moved / "shared" / "teacher_clip")
  with pytest.raises(FileNotFoundError, match=r"text encoder.*teacher_clip\.py"):
    Generator.from_checkpoint(str(row))


@pytest.mark.slow  # 30 s; the CLI over the t2i API tested above
def test_sample_command_t2i_writes_a_png(t2i_root, tiny, tmp_path, capsys):
  out = tmp_path / "t2i.png"
  assert cli.main(["sample", "--workdir", str(t2i_root), "--kind", "t2i", "--prompts",
                   "a red circle at the top left; a blue square;", "--per_label", "3",
                   "--out", str(out)]) == 0
  with Image.open(out) as im:                     # 2 rows (prompts) x 3 columns of 32 px
    assert im.format == "PNG" and im.size == (3 * 34 + 2, 2 * 34 + 2)
  printed = capsys.readouterr().out
  assert "wrote 6 samples" in printed and "row 1: a blue square" in printed
  # --prompts alone picks the t2i stage; the default path names the kind.
  assert cli.main(["sample", "--workdir", str(t2i_root / "vqkd_clip"), "--prompts",
                   "a blue square", "--per_label", "1"]) == 0
  assert (t2i_root / "vqkd_clip" / "sampled_t2i_seed0.png").is_file()
  capsys.readouterr()
  for argv, message in ((["--workdir", str(t2i_root), "--kind", "t2i"], "--prompts"),
                        (["--workdir", str(t2i_root), "--prompts", "a purple square"], "'purple'"),
                        (["--workdir", str(tiny), "--kind", "ar", "--prompts", "a blue square"],
                         "t2i"),
                        (["--workdir", str(t2i_root), "--prompts", "a", "--labels", "1"],
                         "not both")):
    assert cli.main(["sample", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vqkd: error:") and message in err and "\n" not in err


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


def test_samples_split_over_devices_equal_one_device(tiny, ar_gen, nar_gen, t2i_root, t2i_gen,
                                                    tmp_path):
  """With several local devices the AR, NAR and T2I generators split each chunk's rows over them
  (padded to a multiple of the device count): in a process with 8 CPU devices, the tokens of this
  one-device process, for a list longer than one chunk (its last chunk padded to 8 rows) and,
  for AR, one shorter than the device count (one chunk)."""
  import subprocess
  import sys
  import textwrap

  labels = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]
  ar_kw, nar_kw = dict(seed=4, top_k=20, top_p=0.9), dict(seed=4, steps=3)
  want = {"ar_long": ar_gen.sample_tokens(labels, batch_size=8, **ar_kw),
          "ar_short": ar_gen.sample_tokens(labels[:3], **ar_kw),
          "nar_long": nar_gen.sample_tokens(labels, batch_size=8, **nar_kw),
          "t2i_long": t2i_gen.sample_tokens(PROMPTS * 3, batch_size=8, **ar_kw)}
  for key in ("ar_long", "nar_long", "t2i_long"):   # the tokens depend on the network and inputs
    assert len(np.unique(want[key])) > 5, key
  out = tmp_path / "tokens.npz"
  code = textwrap.dedent(f"""
      import numpy as np
      from vqkd_jax import api
      ar = api.Generator.from_checkpoint({str(tiny / "ar")!r})
      nar = api.Generator.from_checkpoint({str(tiny)!r}, kind="nar")
      t2i = api.Generator.from_checkpoint({str(t2i_root)!r}, kind="t2i")
      assert api._local_data_mesh().size == 8
      np.savez({str(out)!r},
               ar_long=ar.sample_tokens({labels}, batch_size=8, **{ar_kw!r}),
               ar_short=ar.sample_tokens({labels[:3]}, **{ar_kw!r}),
               nar_long=nar.sample_tokens({labels}, batch_size=8, **{nar_kw!r}),
               t2i_long=t2i.sample_tokens({PROMPTS * 3!r}, batch_size=8, **{ar_kw!r}))
  """)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
             PYTHONPATH=root)
  proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  got = dict(np.load(out))
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
