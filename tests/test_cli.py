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
