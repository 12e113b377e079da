"""`vqkd bench`: time a stage's update step (or sampling) on synthetic data and print a table.

Throughput is images per second over the timed steps; TFLOP/s per device comes from the update step's
model FLOPs (`step_flops`: matmuls, convolutions and fused attention counted on the jaxpr, forward and
backward; XLA's GPU cost analysis returns nothing for a lowered program and under-counts a compiled
one); MFU divides it by the measured peak of the device (`--peak_tflops`, about 780 bf16 TFLOP/s on
an H100).
"""

from __future__ import annotations

import time

import jax
import numpy as np


def _table(rows: list[dict]) -> str:
  keys = list(rows[0])
  widths = [max(len(k), *(len(str(r[k])) for r in rows)) for k in keys]
  line = lambda vals: "| " + " | ".join(str(v).ljust(w) for v, w in zip(vals, widths)) + " |"
  sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
  return "\n".join([line(keys), sep] + [line([r[k] for k in keys]) for r in rows])


def step_flops(fn, *args) -> float:
  """Model FLOPs of one call `fn(*args)`, counted on its jaxpr (the same on every backend):
  2 M N K per matmul (dot_general), 2 * outputs * (kernel size * input channels / groups) per
  convolution, and for fused attention kernels (cuDNN) 4 B H T S d forward and twice that
  backward. Sub-computations count once, scans `length` times, `cond` its cheapest branch (the
  steady state: one-time branches such as a codebook's k-means initialisation are left out), while
  loops one trip. Elementwise work is not counted (the MFU convention)."""
  import math

  def var_shape(v):
    return tuple(getattr(v.aval, "shape", ()))

  def count(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
      name = eqn.primitive.name
      if name == "dot_general":
        (lc, _), _ = eqn.params["dimension_numbers"]
        lhs = var_shape(eqn.invars[0])
        total += 2.0 * math.prod(var_shape(eqn.outvars[0])) * math.prod(lhs[d] for d in lc)
      elif name == "conv_general_dilated":
        rhs = var_shape(eqn.invars[1])
        out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
        total += 2.0 * math.prod(var_shape(eqn.outvars[0])) * math.prod(rhs) / out_features
      elif "dot_product_attention" in name:
        q, k = var_shape(eqn.invars[0]), var_shape(eqn.invars[1])   # [B, T, N, d], [B, S, N, d]
        fwd = 4.0 * q[0] * q[1] * q[2] * q[3] * k[1]
        total += 2 * fwd if "bwd" in name else fwd
      subs = []
      for key, value in eqn.params.items():
        values = value if isinstance(value, (tuple, list)) else (value,)
        js = [getattr(v, "jaxpr", v) for v in values]
        js = [j for j in js if hasattr(j, "eqns")]
        if js:
          subs.append((key, js))
      for key, js in subs:
        if name == "cond" and key == "branches":
          total += min(count(j) for j in js)
        elif name == "scan":
          total += eqn.params["length"] * sum(count(j) for j in js)
        else:
          total += sum(count(j) for j in js)
    return total

  return count(jax.make_jaxpr(fn)(*args).jaxpr)


def bench_train(config, steps: int = 20, peak_tflops: float = 780.0, warmup: int = 3) -> dict:
  """Times `steps` update steps of config.stage on synthetic batches; returns the table row."""
  from vqkd_jax.train.inputs import make_train_input
  from vqkd_jax.train.loop import setup

  with config.unlocked():
    config.data.synthetic = True
  t = setup(config)
  it = make_train_input(config)
  batch = t.put_batch(next(it))
  state = t.state
  flops = step_flops(t.update_fn, state, batch, t.frozen)
  for _ in range(warmup):
    state, metrics = t.update_fn(state, batch, t.frozen)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = t.update_fn(state, batch, t.frozen)
  jax.block_until_ready(metrics)
  seconds = (time.perf_counter() - start) / steps
  n_dev = jax.device_count()
  tflops = flops / seconds / 1e12  # per device: the compiled program is per device
  row = {
      "stage": config.stage, "strategy": config.parallel.strategy, "devices": n_dev,
      "device": jax.devices()[0].device_kind, "precision": config.precision,
      "global_batch": config.batch_size, "step_ms": f"{seconds * 1e3:.1f}",
      "images/s": f"{config.batch_size / seconds:.0f}",
      "TFLOP/s/device": f"{tflops:.1f}",
      "MFU": f"{100 * tflops / peak_tflops:.1f}%" if jax.default_backend() != "cpu" else "n/a",
  }
  return row


def bench_pipeline(demo_config, steps: int = 30, rows: tuple = (), workdir: str | None = None
                   ) -> list[dict]:
  """Trains the stages of a demo config (configs/demo/demo.py) in the demo's order, each for `steps`
  updates on the built-in data (its warm-up and GAN start scaled with the steps, as the demo's size
  variants do) and reading the checkpoints of the stages before it; `rows` restricts the plan to
  those rows and the shared stages they read. Returns a row per stage: the step time over the last
  third of the steps, images/s, and setup_s (the stage's wall time less its steps at that rate:
  building, compiling, restoring, saving)."""
  import tempfile

  from vqkd_jax.config import ConfigError, scale_steps
  from vqkd_jax.demo import plan
  from vqkd_jax.train.loop import train

  if steps < 3:
    raise ConfigError(f"bench pipeline needs at least 3 steps (it times the last third), "
                      f"got {steps}")
  cfg = demo_config.copy_and_resolve_references()
  if rows:
    unknown = sorted(set(rows) - set(cfg.row_order))
    if unknown:
      raise ConfigError(f"rows {unknown} are not in the config's rows {list(cfg.row_order)}")
    with cfg.unlocked():
      cfg.row_order = tuple(r for r in cfg.row_order if r in rows)
  with cfg.unlocked():
    cfg.seeds = 1
  workdir = workdir or tempfile.mkdtemp(prefix="vqkd_bench_")
  stages, _, _ = plan(cfg, workdir)
  out = []
  window = steps // 3
  for s in stages:
    c = s.config
    with c.unlocked():
      scale_steps(c, steps)
      c.log_every = window
      c.eval_every = 0
    start = time.perf_counter()
    result = train(c, s.workdir)
    wall = time.perf_counter() - start
    last = [h for h in result.history if "steps_per_sec" in h][-1]
    step_s = 1.0 / last["steps_per_sec"]
    out.append({"stage": s.name, "kind": c.stage, "device": jax.devices()[0].device_kind,
                "precision": c.precision, "batch": c.batch_size,
                "step_ms": f"{1e3 * step_s:.1f}", "images/s": f"{last['examples_per_sec']:.0f}",
                "setup_s": f"{max(wall - steps * step_s, 0.0):.1f}", "loss": f"{last['loss']:.4f}"})
  return out


def bench_fid(batch: int = 256, image_size: int = 256, mode: str = "exact", steps: int = 10,
              warmup: int = 2, preprocess: str = "torch", peak_tflops: float = 780.0,
              drift_images: int = 5000) -> dict:
  """Times the FID Inception forward (random weights, random uint8 [batch, image_size,
  image_size, 3], batch sharded over the local devices) in precision `mode` (inception.
  PRECISION_MODES), and the Fréchet distance of random 2048-d statistics on the host (float64).

  Returns the table row: images/s of the forward on device-resident inputs, images/s end to end
  (host uint8 in, features and logits back on the host, the extractor's pipelining), TFLOP/s per
  device from the jaxpr's conv/matmul FLOPs, and the Fréchet time in seconds; for a mode other
  than exact, the FID drift against exact on 2 x `drift_images` images (fid_drift; 0 skips it).
  """
  from vqkd_jax.evaluation import fid as fid_lib
  from vqkd_jax.evaluation import inception as inception_lib
  from vqkd_jax.evaluation.frechet import frechet_distance

  params = inception_lib.random_inception_params(0)
  ex = fid_lib.InceptionExtractor(params, batch_size=batch, preprocess=preprocess,
                                  precision_mode=mode)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (ex.batch_size, image_size, image_size, 3), dtype=np.uint8)
  x = jax.device_put(images, ex.batch_sharding)
  flops = step_flops(lambda p, im: ex.model.apply({"params": p}, im), ex.params, x)
  for _ in range(warmup):
    out = ex._forward(ex.params, x)
  jax.block_until_ready(out)
  start = time.perf_counter()
  for _ in range(steps):
    out = ex._forward(ex.params, x)
  jax.block_until_ready(out)
  seconds = (time.perf_counter() - start) / steps
  start = time.perf_counter()
  n = sum(o["pool"].shape[0] for o in ex.stream(images for _ in range(steps)))
  end_to_end = n / (time.perf_counter() - start)

  d = 2048
  w1, w2 = rng.standard_normal((d, 3000)), rng.standard_normal((d, 3000)) * 1.1
  stats = (rng.standard_normal(d), w1 @ w1.T / 3000, rng.standard_normal(d), w2 @ w2.T / 3000)
  frechet_distance(*stats)   # warm the BLAS/LAPACK threads
  fd_times = []
  for _ in range(3):
    start = time.perf_counter()
    frechet_distance(*stats)
    fd_times.append(time.perf_counter() - start)
  n_dev = len(ex.mesh.devices.flat)
  tflops = flops / seconds / 1e12 / n_dev
  drift = fid_drift(params, mode, n=drift_images, batch=batch, image_size=image_size,
                    preprocess=preprocess) if mode != "exact" and drift_images else {}
  return {
      "bench": "fid", "devices": n_dev, "device": jax.devices()[0].device_kind, "mode": mode,
      "preprocess": preprocess, "batch": ex.batch_size, "image_size": image_size,
      "step_ms": f"{seconds * 1e3:.1f}", "images/s": f"{ex.batch_size / seconds:.0f}",
      "images/s_end_to_end": f"{end_to_end:.0f}", "TFLOP/s/device": f"{tflops:.2f}",
      "MFU": f"{100 * tflops / peak_tflops:.1f}%" if jax.default_backend() != "cpu" else "n/a",
      "frechet_2048_s": f"{min(fd_times):.3f}",
      **drift,
  }


def _drift_images(n: int, batch: int, size: int, seed: int, shift: bool):
  """n uint8 images in batches: random 8x8 colour layouts upsampled to `size` with pixel noise;
  `shift` lowers the contrast and adds more noise (a second distribution, so that the FID between
  the two sets is far from 0)."""
  rng = np.random.default_rng(seed)
  for i in range(0, n, batch):
    k = min(batch, n - i)
    small = rng.uniform(0, 255, (k, 8, 8, 3)).astype(np.float32)
    x = np.repeat(np.repeat(small, size // 8, 1), size // 8, 2)
    if shift:
      x = 0.7 * x + 0.15 * 255
    x += rng.standard_normal(x.shape, np.float32) * np.float32(25 if shift else 10)
    yield np.clip(x, 0, 255).astype(np.uint8)


def fid_drift(params, mode: str, n: int = 5000, batch: int = 256, image_size: int = 256,
              preprocess: str = "torch") -> dict:
  """The FID between two fixed sets of n images, measured with the float32 exact network and with
  `mode`: {fid_exact, fid_<mode>, fid_drift = |difference|, pool_rel_err = max |pool - pool_exact|
  / max |pool_exact| on the first batch}. The same params for both (random weights here; the
  issue's bound of 0.05 is on fid_drift)."""
  from vqkd_jax.evaluation import fid as fid_lib
  from vqkd_jax.evaluation.frechet import frechet_distance_from_stats

  out, pools = {}, {}
  first = next(_drift_images(batch, batch, image_size, 1, False))
  for m in ("exact", mode):
    ex = fid_lib.InceptionExtractor(params, batch_size=batch, preprocess=preprocess,
                                    precision_mode=m, outputs=("pool",))
    pools[m] = ex(first)["pool"].astype(np.float64)
    a, _ = fid_lib.inception_outputs(ex, _drift_images(n, batch, image_size, 1, False), False)
    b, _ = fid_lib.inception_outputs(ex, _drift_images(n, batch, image_size, 2, True), False)
    out[m] = frechet_distance_from_stats(a, b)
  rel = np.abs(pools[mode] - pools["exact"]).max() / np.abs(pools["exact"]).max()
  return {"fid_exact": f"{out['exact']:.4f}", f"fid_{mode}": f"{out[mode]:.4f}",
          "fid_drift": f"{abs(out[mode] - out['exact']):.4f}", "pool_rel_err": f"{rel:.1e}",
          "drift_images": 2 * n}


def main(what: str, config, steps: int, peak_tflops: float, rows: tuple = ()) -> None:
  if what == "train":
    row = bench_train(config, steps=steps, peak_tflops=peak_tflops)
  elif what == "pipeline":
    print(_table(bench_pipeline(config, steps=steps, rows=rows)))
    return
  else:
    from vqkd_jax.api import bench_nar_sampling, bench_sampling
    bench_fn = bench_nar_sampling if config.get("stage") == "nar" else bench_sampling
    print(_table(bench_fn(config, steps=steps)))
    return
  print(_table([row]))
