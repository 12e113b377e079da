"""Config loading, variants and overrides; one-line errors naming the problem."""

import textwrap

import pytest

from vqkd_jax import cli
from vqkd_jax.config import (ConfigError, apply_overrides, load_config,
                             load_config_with_overrides, parse_arg, scale_steps, training_config)


@pytest.fixture
def config_file(tmp_path):
  path = tmp_path / "exp.py"
  path.write_text(textwrap.dedent("""
      from vqkd_jax.config import parse_arg, training_config
      def get_config(arg=None):
        arg = parse_arg(arg, variant="small", runlocal=False)
        c = training_config("vqkd", total_steps=10 if arg.runlocal else 1000)
        c.width = {"small": 64, "big": 256}[arg.variant]
        return c
  """))
  return str(path)


def test_variants_and_overrides(config_file):
  c = load_config_with_overrides(f"{config_file}:big,runlocal=True",
                                 ["optimizer.lr=1e-3", "parallel.strategy=fsdp", "seed=3",
                                  "parallel.mesh.fsdp=4"])
  assert c.width == 256 and c.total_steps == 10
  assert c.optimizer.lr == 1e-3 and isinstance(c.optimizer.lr, float)
  assert c.parallel.strategy == "fsdp" and c.seed == 3 and c.parallel.mesh.fsdp == 4


def test_unknown_key_names_it_and_suggests(config_file):
  c = load_config(config_file)
  with pytest.raises(ConfigError, match=r"unknown config key 'optimizer.lrr' \(did you mean 'optimizer.lr'\?\)"):
    apply_overrides(c, ["optimizer.lrr=1"])


def test_wrong_type_names_key(config_file):
  c = load_config(config_file)
  with pytest.raises(ConfigError, match=r"'total_steps' expects int, got 'ten'"):
    apply_overrides(c, ["total_steps=ten"])
  with pytest.raises(ConfigError, match=r"'optimizer.lr' expects float"):
    apply_overrides(c, ["optimizer.lr=fast"])


def test_missing_file_and_bad_arg(tmp_path, config_file):
  with pytest.raises(ConfigError, match="config file not found"):
    load_config(str(tmp_path / "nope.py"))
  with pytest.raises(ConfigError, match="unknown config argument 'runlokal'"):
    load_config(f"{config_file}:runlokal=True")


def test_parse_arg_casts():
  a = parse_arg("variant=B,steps=5,lr=0.5,flag", variant="A", steps=1, lr=0.1, flag=False)
  assert (a.variant, a.steps, a.lr, a.flag) == ("B", 5, 0.5, True)


def test_cli_prints_one_line_error(config_file, capsys, tmp_path):
  rc = cli.main(["train", "--config", config_file, "--workdir", str(tmp_path / "w"),
                 "--config.optimizer.lrr=1"])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2 and len(err) == 1 and "optimizer.lrr" in err[0]


def test_training_config_locked_rejects_typos():
  c = training_config("vqkd")
  c.lock()
  with pytest.raises(AttributeError):
    c.totl_steps = 3


def test_scale_steps_scales_warmup_and_gan_start_with_the_steps():
  from vqkd_jax.train.optimizers import optimizer_config
  c = training_config("vqgan", total_steps=1000)
  c.log_every = 100
  c.optimizer = optimizer_config(lr=1e-3, warmup_steps=100)
  c.disc_optimizer = optimizer_config(lr=1e-3, warmup_steps=30)
  c.gan = {"start": 680, "weight": 0.1}
  scale_steps(c, 250)  # ratio 1/4
  assert (c.total_steps, c.eval_every, c.checkpoint_every, c.log_every) == (250, 250, 250, 62)
  assert (c.optimizer.warmup_steps, c.disc_optimizer.warmup_steps, c.gan.start) == (25, 8, 170)
  assert c.gan.weight == 0.1
