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


def test_bench_pipeline_refuses_unknown_rows_and_too_few_steps(capsys):
  rc = cli.main(["bench", "pipeline", "--config", "configs/demo/demo.py:runlocal", "--rows",
                 "vqgan,vqkd_xyz", "--steps", "3"])
  assert rc == 2 and "['vqkd_xyz']" in capsys.readouterr().err
  rc = cli.main(["bench", "pipeline", "--config", "configs/demo/demo.py:runlocal", "--steps", "2"])
  assert rc == 2 and "at least 3 steps" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_pipeline_trains_a_row_and_the_shared_stages_it_reads(capsys, tmp_path):
  from vqkd_jax import bench
  from vqkd_jax.config import load_config
  rows = bench.bench_pipeline(load_config("configs/demo/demo.py:runlocal"), steps=3, rows=("fsq",),
                              workdir=str(tmp_path))
  assert [r["stage"] for r in rows] == ["shared/perceptual", "shared/evaluator", "fsq/tokenizer",
                                        "fsq/ar", "fsq/nar"]
  assert all(float(r["step_ms"]) > 0 and float(r["setup_s"]) >= 0 for r in rows)


def test_override_with_separate_value(tmp_path, capsys):
  rc = cli.main(["train", "--config", "configs/demo/teacher.py:runlocal", "--workdir",
                 str(tmp_path), "--config.optimizer.lr", "fast"])
  assert rc == 2 and "'optimizer.lr' expects float" in capsys.readouterr().err


def test_step_flops_counts_matmuls_convs_and_scans_in_closed_form():
  import jax
  import jax.numpy as jnp

  from vqkd_jax.bench import step_flops

  def f(a, b, c, img, k):
    h = jnp.tanh(a @ b) @ c
    y = jax.lax.conv_general_dilated(img, k, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    s, _ = jax.lax.scan(lambda x, _: (x @ c.T @ c, None), h, None, length=3)
    # A cond counts its cheapest branch (the steady state), here the identity.
    z = jax.lax.cond(a[0, 0] > 0, lambda x: x, lambda x: x @ b @ b.T, a)
    return h.sum() + y.sum() + s.sum() + z.sum()

  args = (jnp.ones((128, 256)), jnp.ones((256, 64)), jnp.ones((64, 32)), jnp.ones((2, 8, 8, 3)),
          jnp.ones((3, 3, 3, 16)))
  expected = (2 * 128 * 256 * 64 + 2 * 128 * 64 * 32          # the two matmuls
              + 2 * (2 * 8 * 8 * 16) * (3 * 3 * 3)             # conv: outputs x kernel x C_in
              + 3 * 2 * (2 * 128 * 32 * 64))                   # 3 scan trips of two matmuls
  assert step_flops(jax.jit(f), *args) == expected
  # Forward + backward of a matmul: 3x the forward.
  g = jax.grad(lambda a, b: jnp.sum(a @ b), argnums=(0, 1))
  assert step_flops(g, args[0], args[1]) == 3 * 2 * 128 * 256 * 64
