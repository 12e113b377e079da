"""The shared loop: strategies agree, resumption is exact, bad states fail loudly.

Multi-device runs use 8 simulated CPU devices in subprocesses (XLA_FLAGS must be set before JAX
starts, and this process has already started it with one device).
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from vqkd_jax.train import loop
from vqkd_jax.train.checkpoint import CheckpointError

sys.path.insert(0, os.path.dirname(__file__))
from toy_stage import toy_config, toy_objective  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _run_script(code: str, devices: int = 8, timeout: int = 600) -> str:
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             PYTHONPATH=os.pathsep.join([ROOT, HERE]), JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc.stdout


def _flat(tree):
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in
          jax.tree_util.tree_leaves_with_path(tree)}


# name -> (strategy, devices, mesh axis sizes) of a toy-stage run compared with one device.
_STRATEGY_RUNS = {"single": ("dp", 1, {}), "pmap": ("pmap", 8, {}), "dp": ("dp", 8, {}),
                  "fsdp": ("fsdp", 8, {}), "tp": ("tp", 8, {}),
                  "fsdp_tp": ("fsdp_tp", 8, {"fsdp": 4, "tensor": 2}),
                  "fsdp_host_init": ("fsdp", 8, {})}


def test_data_and_fsdp_tp_strategies_match_one_device(tmp_path):
  """DP and the FSDP x TP mix (every mesh axis) in the default suite; the rest in the slow test."""
  _check_strategies_match_one_device(tmp_path, ("dp", "fsdp_tp"))


@pytest.mark.slow  # 7 runs on 8 CPU devices: 3-4 minutes on 2 cores
def test_all_strategies_match_one_device(tmp_path):
  _check_strategies_match_one_device(
      tmp_path, ("pmap", "dp", "fsdp", "tp", "fsdp_tp", "fsdp_host_init"))


def _check_strategies_match_one_device(tmp_path, strategies):
  out = tmp_path / "results.npz"
  runs = [(name, *_STRATEGY_RUNS[name]) for name in ("single", *strategies)]
  _run_script(f"""
      import jax, numpy as np
      from vqkd_jax.train import loop
      from toy_stage import toy_config, toy_objective
      results = {{}}
      runs = {runs!r}
      for name, strategy, n, mesh in runs:
        c = toy_config(parallel__strategy=strategy, parallel__num_devices=n, checkpoint_every=100)
        c.parallel.init_on = "host" if name.endswith("host_init") else "device"
        for k, v in mesh.items():
          c.parallel.mesh[k] = v
        axis = "batch" if strategy == "pmap" else None
        r = loop.train(c, "{tmp_path}/" + name, objective=toy_objective(c, axis))
        results[name + "/loss"] = np.array([h["loss"] for h in r.history])
        results[name + "/codes_used"] = np.array([h["codes_used"] for h in r.history])
        for path, leaf in jax.tree_util.tree_leaves_with_path(
            {{"params": r.state.params, "model_state": r.state.model_state}}):
          results[name + "/" + jax.tree_util.keystr(path)] = np.asarray(jax.device_get(leaf))
      np.savez("{out}", **results)
  """)
  res = dict(np.load(out))
  single = {k.split("/", 1)[1]: v for k, v in res.items() if k.startswith("single/")}
  assert len(single["loss"]) == 6
  assert any("codebook" in k for k in single), "codebook state must be compared too"
  for strategy in strategies:
    for key, ref in single.items():
      got = res[f"{strategy}/{key}"]
      if ref.dtype == bool or np.issubdtype(ref.dtype, np.integer):
        np.testing.assert_array_equal(got, ref, err_msg=f"{strategy} {key}")
      else:
        np.testing.assert_allclose(got, ref, rtol=2e-4, atol=2e-5, err_msg=f"{strategy} {key}")


def test_nonfinite_loss_names_step_and_keeps_checkpoint(tmp_path):
  c = toy_config(total_steps=6, checkpoint_every=1)
  c.optimizer.schedule = "constant"
  c.optimizer.lr = 1e38  # The first update overflows the parameters; the next loss is NaN.
  c.optimizer.grad_clip_norm = 0.0
  with pytest.raises(loop.NonFiniteLossError, match=r"at step 2 "):
    loop.train(c, str(tmp_path), objective=toy_objective(c))
  saved = loop.load_trained(str(tmp_path))
  assert saved["step"] == 1
  assert all(np.isfinite(v).all() for v in _flat(saved["params"]).values())


def test_missing_and_corrupt_checkpoints_fail_clearly(tmp_path):
  with pytest.raises(CheckpointError, match="no checkpoint"):
    loop.load_trained(str(tmp_path / "nothing"))
  c = toy_config(total_steps=2, checkpoint_every=2)
  loop.train(c, str(tmp_path / "run"), objective=toy_objective(c))
  state_dir = tmp_path / "run" / "checkpoints" / "2" / "state"
  corrupted = 0
  for root, _, files in os.walk(state_dir):
    for f in files:
      with open(os.path.join(root, f), "wb") as fh:
        fh.write(b"garbage")
      corrupted += 1
  assert corrupted
  with pytest.raises(CheckpointError, match="cannot"):
    loop.train(c.copy_and_resolve_references(), str(tmp_path / "run"),
               objective=toy_objective(c))


def test_sigkill_then_resume_is_bit_identical(tmp_path):
  """A run killed with SIGKILL mid-training and resumed ends bit-identical to an uninterrupted one."""
  script = textwrap.dedent("""
      import sys, numpy as np, jax
      from vqkd_jax.train import loop
      from toy_stage import toy_config, toy_objective
      c = toy_config(total_steps=40, checkpoint_every=5)
      r = loop.train(c, sys.argv[1], objective=toy_objective(c))
      flat = {jax.tree_util.keystr(k): np.asarray(v) for k, v in
              jax.tree_util.tree_leaves_with_path({"p": r.state.params, "s": r.state.model_state,
                                                   "o": r.state.opt_state})}
      np.savez(sys.argv[2], **flat)
  """)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, HERE]), JAX_PLATFORMS="cpu")
  run = lambda wd, out: subprocess.Popen([sys.executable, "-c", script, str(wd), str(out)], env=env,
                                         cwd=ROOT, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE)
  ref = run(tmp_path / "ref", tmp_path / "ref.npz")
  victim = run(tmp_path / "victim", tmp_path / "victim.npz")
  ckpts = tmp_path / "victim" / "checkpoints"
  deadline = time.time() + 300
  while time.time() < deadline:  # Kill once a mid-run checkpoint has been committed.
    steps = [int(p) for p in os.listdir(ckpts) if p.isdigit()] if ckpts.exists() else []
    if any(10 <= s < 40 for s in steps):
      break
    time.sleep(0.05)
  victim.send_signal(signal.SIGKILL)
  victim.wait()
  assert not (tmp_path / "victim.npz").exists(), "the victim finished before it was killed"
  killed_at = max(int(p) for p in os.listdir(ckpts) if p.isdigit())
  assert killed_at < 40
  resumed = run(tmp_path / "victim", tmp_path / "victim.npz")
  assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()[-3000:]
  assert ref.wait(timeout=300) == 0, ref.stderr.read().decode()[-3000:]
  a, b = np.load(tmp_path / "ref.npz"), np.load(tmp_path / "victim.npz")
  assert set(a.files) == set(b.files)
  for k in a.files:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_fsdp_checkpoint_restores_on_one_device(tmp_path):
  out = tmp_path / "fsdp.npz"
  _run_script(f"""
      import jax, numpy as np
      from vqkd_jax.train import loop
      from toy_stage import toy_config, toy_objective
      c = toy_config(total_steps=3, checkpoint_every=3, parallel__strategy="fsdp")
      r = loop.train(c, "{tmp_path}/run", objective=toy_objective(c))
      sharded = [l for l in jax.tree.leaves(r.state.params) if len(l.sharding.device_set) == 8
                 and not l.sharding.is_fully_replicated]
      assert sharded, "nothing was sharded under fsdp"
      np.savez("{out}", **{{jax.tree_util.keystr(k): np.asarray(jax.device_get(v)) for k, v in
                            jax.tree_util.tree_leaves_with_path(r.state.params)}})
  """)
  assert jax.device_count() == 1
  restored = loop.load_trained(str(tmp_path / "run"))
  expected = np.load(out)
  got = _flat(restored["params"])
  assert set(got) == set(expected.files)
  for k in expected.files:
    np.testing.assert_array_equal(got[k], expected[k], err_msg=k)
  # The loop itself resumes that checkpoint on one device and continues.
  c = toy_config(total_steps=4, checkpoint_every=4)
  r = loop.train(c, str(tmp_path / "run"), objective=toy_objective(c))
  assert r.steps_run == 1


def test_fast_compiled_initialiser_gives_the_plain_jit_values():
  """The state initialiser is compiled with xla_options.FAST_COMPILE (it runs once); a VQGAN
  trunk (convolutions, GroupNorm, attention, a codebook) initialises to exactly what a plain
  jax.jit gives on both init paths."""
  import flax.linen as nn
  import jax.numpy as jnp
  from vqkd_jax.tokenizers.vqgan import VQGANTokenizer

  models = [(VQGANTokenizer(num_codes=32, code_dim=8, width=8, encoder_mults=(1, 2),
                            encoder_blocks=1, encoder_attn=(1,), decoder_mults=(2, 1),
                            decoder_blocks=1, decoder_attn=(0,), z_channels=8),
             jnp.zeros((1, 16, 16, 3)))]
  rng = jax.random.PRNGKey(3)
  for model, x in models:
    fn = lambda r, model=model, x=x: nn.unbox(model.init(r, x))
    want = _flat(jax.jit(fn)(rng))
    shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]),
                             jax.eval_shape(fn, rng))
    for where in ("device", "host"):
      got = _flat(loop.init_sharded(fn, rng, shardings, where))
      assert got.keys() == want.keys()
      for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=f"{where}: {k}")
