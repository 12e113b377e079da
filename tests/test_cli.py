"""The `vqkd` command's subcommands that the demo test does not cover."""

import pytest

from vqkd_jax import cli


def test_bench_train_prints_a_table(capsys):
  rc = cli.main(["bench", "train", "--config", "configs/demo/teacher.py:runlocal", "--steps", "2"])
  assert rc == 0
  out = capsys.readouterr().out
  header, sep, row = out.strip().splitlines()[-3:]
  assert "images/s" in header and "MFU" in header and row.startswith("| teacher")


def test_unknown_subcommand_and_missing_config(tmp_path, capsys):
  with pytest.raises(SystemExit):
    cli.main(["trian"])
  rc = cli.main(["train", "--config", str(tmp_path / "missing.py"), "--workdir", str(tmp_path)])
  assert rc == 2 and "config file not found" in capsys.readouterr().err


def test_override_with_separate_value(tmp_path, capsys):
  rc = cli.main(["train", "--config", "configs/demo/teacher.py:runlocal", "--workdir",
                 str(tmp_path), "--config.optimizer.lr", "fast"])
  assert rc == 2 and "'optimizer.lr' expects float" in capsys.readouterr().err


def test_step_flops_counts_matmuls_in_closed_form():
  import jax
  import jax.numpy as jnp

  from vqkd_jax.bench import step_flops

  f = jax.jit(lambda a, b, c: jnp.tanh(a @ b) @ c)
  lowered = f.lower(jnp.ones((128, 256)), jnp.ones((256, 64)), jnp.ones((64, 32)))
  matmuls = 2 * 128 * 256 * 64 + 2 * 128 * 64 * 32
  assert matmuls <= step_flops(lowered) <= matmuls * 1.05
