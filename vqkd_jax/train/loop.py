"""The one training loop that every stage runs (the stage supplies an Objective).

Sections, in reading order: logging, mesh, input pipeline, objective and optimizer, sharded state,
checkpoint restore, update step, loop. Common config fields:

  stage, seed, total_steps, batch_size (global), precision ("float32" | "bfloat16"),
  data: name, data_dir, image_size, augmentation, synthetic
  optimizer: see train/optimizers.py
  parallel: strategy ("pmap" | "dp" | "fsdp" | "tp" | "fsdp_tp"), mesh (data/fsdp/tensor sizes; one
    -1), num_devices (0 = all; fewer for scaling studies and tests), init_on ("auto" | "host" |
    "device": where the initial state is computed, see init_sharded)
  log_every, eval_every, checkpoint_every, keep_checkpoints
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vqkd_jax.parallel import mesh as mesh_lib
from vqkd_jax.parallel.strategies import get_strategy
from vqkd_jax.parallel.xla_options import FAST_COMPILE, jit_with_options
from vqkd_jax.train import checkpoint as ckpt_lib
from vqkd_jax.train import inputs as inputs_lib
from vqkd_jax.train import metric_writers
from vqkd_jax.train.objective import EvalContext, Objective
from vqkd_jax.train.optimizers import make_stage_optimizer
from vqkd_jax.train.state import TrainState

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
  """Raised when a training loss is NaN or infinite; the last good checkpoint stays as it was."""


class Preempted(SystemExit):
  """Raised after SIGTERM: a checkpoint of the current step was written; rerun to resume."""


@dataclasses.dataclass
class TrainResult:
  state: TrainState
  history: list[dict]
  workdir: str
  steps_run: int


def train(config, workdir: str, objective: Objective | None = None,
          stop_after: int | None = None) -> TrainResult:
  """Trains `config.stage` in `workdir`, resuming from its newest checkpoint.

  Args:
    config: a locked ConfigDict (fields in the module docstring).
    workdir: where checkpoints, metrics.jsonl, TensorBoard events and image grids go.
    objective: overrides the stage's objective (tests); built from the config otherwise.
    stop_after: stop after this many updates in this call (tests of resumption); None = run to end.
  Returns:
    TrainResult with the final (device) state and the per-log-step metric history of this call.
  """
  # ------------------------------------------------------------------ Logging
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  writer = metric_writers.MultiWriter(
      [metric_writers.JsonlWriter(os.path.join(workdir, "metrics.jsonl")),
       metric_writers.TensorBoardWriter(os.path.join(workdir, "tensorboard"))] if is_main else [])

  # ------------------------------------------------------------------ Input pipeline
  data_iter = inputs_lib.make_train_input(config)

  # ------------------------------------------------------------------ Mesh, objective, sharded state
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                       keep=config.keep_checkpoints)
  t = setup(config, workdir, objective, checkpointer=checkpointer, data_iter=data_iter)
  state, frozen, update_fn, put_batch, host_state = (
      t.state, t.frozen, t.update_fn, t.put_batch, t.host_state)
  objective, mesh = t.objective, t.mesh

  # ------------------------------------------------------------------ Loop
  step = int(jax.device_get(host_state(state).step))
  first_step, history = step, []
  preempted = {"flag": False}
  old_handler = _install_sigterm(preempted)
  progress = metric_writers.ProgressBar(total=config.total_steps, initial=step,
                                        desc=f"{config.stage}", disable=not is_main)
  pending = None  # (step, metrics) of the previous update, checked one step late (no stall)
  last_time, last_step = time.time(), step

  def check(pending):
    nonlocal last_time, last_step
    p_step, p_metrics = pending
    values = {k: float(np.mean(v)) for k, v in jax.device_get(p_metrics).items()}
    if not np.isfinite(values["loss"]):
      raise NonFiniteLossError(
          f"non-finite loss {values['loss']} at step {p_step} of stage {config.stage}; the state was "
          f"not updated and the last checkpoint ({checkpointer.latest_step()}) is intact")
    if p_step % config.log_every == 0 or p_step == config.total_steps:
      now = time.time()
      values["steps_per_sec"] = (p_step - last_step) / max(now - last_time, 1e-9)
      values["examples_per_sec"] = values["steps_per_sec"] * config.batch_size
      last_time, last_step = now, p_step
      writer.write_scalars(p_step, values)
      history.append(dict(step=p_step, **values))
    progress.update(p_step, values)

  try:
    while step < config.total_steps:
      if stop_after is not None and step - first_step >= stop_after:
        break
      batch = put_batch(next(data_iter))
      state, metrics = update_fn(state, batch, frozen)
      step += 1
      if pending is not None:
        check(pending)
      pending = (step, metrics)
      save_now = step % config.checkpoint_every == 0 or step == config.total_steps
      if save_now or preempted["flag"]:
        check(pending)
        pending = None
        checkpointer.save(step, host_state(state), data_iter.get_state())
      if preempted["flag"]:
        checkpointer.wait()
        raise Preempted(f"preempted at step {step}; checkpoint saved, rerun to resume")
      if objective.evaluate and config.eval_every and (
          step % config.eval_every == 0 or step == config.total_steps):
        s = host_state(state)
        ctx = EvalContext(step=step, params=s.params, model_state=s.model_state,
                          frozen=host_state(frozen) if frozen is not None else None,
                          workdir=workdir, mesh=mesh)
        eval_metrics = objective.evaluate(ctx)
        writer.write_scalars(step, {f"eval/{k}": v for k, v in eval_metrics.items()})
        history.append(dict(step=step, **{f"eval/{k}": v for k, v in eval_metrics.items()}))
    if pending is not None:
      check(pending)
  finally:
    progress.close()
    checkpointer.close()
    writer.close()
    signal.signal(signal.SIGTERM, old_handler) if old_handler is not None else None
  return TrainResult(state=host_state(state), history=history, workdir=workdir,
                     steps_run=step - first_step)


@dataclasses.dataclass
class Trainer:
  """Everything the loop (or a benchmark) needs to run update steps."""
  mesh: Any
  objective: Objective
  state: Any            # device state (replicated per device under pmap)
  frozen: Any
  update_fn: Any        # (state, global batch, frozen) -> (state, metrics); donates state
  put_batch: Any        # per-process numpy batch -> what update_fn takes
  host_state: Any       # device state -> one copy (unreplicates under pmap)
  schedule: Any


def setup(config, workdir: str | None = None, objective: Objective | None = None,
          checkpointer: ckpt_lib.Checkpointer | None = None, data_iter=None) -> Trainer:
  """Builds the mesh, the objective, the optimizer, the sharded state (restored from `checkpointer`
  when it holds a checkpoint, together with `data_iter`'s position) and the jitted update."""
  # ------------------------------------------------------------------ Mesh
  strategy = get_strategy(config.parallel.strategy)
  mesh_shape = dict(strategy.default_mesh)
  mesh_shape.update({k: v for k, v in config.parallel.mesh.items() if v is not None})
  devices = jax.devices()[:config.parallel.num_devices or None]
  mesh = mesh_lib.make_mesh(mesh_shape if not strategy.uses_pmap else
                            {"data": -1, "fsdp": 1, "tensor": 1}, devices)
  axis_name = "batch" if strategy.uses_pmap else None
  log.info("mesh %s, strategy %s", dict(mesh.shape), strategy.name)

  if config.batch_size % len(devices):
    raise ValueError(f"batch_size {config.batch_size} is not divisible by {len(devices)} devices")

  # ------------------------------------------------------------------ Objective and optimizer
  if objective is None:
    from vqkd_jax.train import stages
    objective = stages.make_objective(config, workdir=workdir, axis_name=axis_name)

  # ------------------------------------------------------------------ Training state, sharded
  example = inputs_lib.example_batch(config)
  rng = jax.random.PRNGKey(config.seed)
  abstract_vars = jax.eval_shape(lambda r: objective.init(jax.random.fold_in(r, 0), example), rng)
  tx, schedule = make_stage_optimizer(config, list(abstract_vars["params"]))

  def init_state(rng):
    variables = objective.init(jax.random.fold_in(rng, 0), example)
    return TrainState.create(nn.unbox(variables), tx, rng)

  abstract_state = jax.eval_shape(init_state, rng)
  if strategy.uses_pmap:
    state_shardings = jax.tree.map(lambda _: mesh_lib.replicated(mesh), abstract_state)
  else:
    state_shardings = _state_shardings(abstract_vars, abstract_state, tx, mesh, strategy)
  report = mesh_lib.sharding_report(state_shardings.params, abstract_state.params)
  log.info("parameters: %.2f MB, %.0f%% sharded", report["bytes"] / 1e6,
           100 * report["sharded_fraction"])

  # ------------------------------------------------------------------ Checkpoint restore
  if checkpointer is not None and checkpointer.latest_step() is not None:
    state, data_state, step = checkpointer.restore(
        ckpt_lib.abstract_like(abstract_state, state_shardings))
    if data_iter is not None:
      data_iter.set_state(data_state)
    log.info("resumed from step %d", step)
  else:
    edit = None
    if objective.init_params is not None:
      edit = lambda s: s.replace(params=objective.init_params(s.params))
    state = init_sharded(init_state, rng, state_shardings, config.parallel.init_on, edit=edit)
  frozen = objective.frozen

  # ------------------------------------------------------------------ Update step
  def update(state: TrainState, batch: dict, frozen: Any):
    # The same key on every device under pmap: k-means inits agree, and a pmap run draws what a
    # jit run draws for the same batch positions within a shard.
    step_rng = jax.random.fold_in(state.rng, state.step)

    def loss_fn(params):
      return objective.loss(params, state.model_state, frozen, batch, step_rng, True)

    (loss, (metrics, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    if axis_name:
      grads, loss, metrics = jax.lax.pmean((grads, loss, metrics), axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if objective.after_update is not None:
      params, model_state = objective.after_update(params, model_state)
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                        model_state=model_state)
    # A non-finite loss leaves the state as it was (the host then stops with an error).
    finite = jnp.isfinite(loss)
    new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, state.replace(step=state.step + 1))
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads),
                   learning_rate=schedule(state.step))
    return new, metrics

  if strategy.uses_pmap:
    devices = [d for d in devices if d.process_index == jax.process_index()]
    update_fn = jax.pmap(update, axis_name=axis_name, donate_argnums=(0,), devices=devices)
    replicate = _replicator(devices)
    state = replicate(jax.device_get(state))
    frozen = replicate(jax.device_get(frozen)) if frozen is not None else None
    put_batch = lambda b: jax.tree.map(
        lambda x: x.reshape((len(devices), -1) + x.shape[1:]), b)
    host_state = lambda s: jax.tree.map(lambda x: x[0], s)
  else:
    frozen_sharding = mesh_lib.replicated(mesh)
    frozen = jax.device_put(frozen, frozen_sharding) if frozen is not None else None
    update_fn = jax.jit(update, donate_argnums=(0,),
                        out_shardings=(state_shardings, mesh_lib.replicated(mesh)))
    batch_sharding = mesh_lib.batch_sharding(mesh)
    put_batch = lambda b: inputs_lib.to_global_batch(b, batch_sharding)
    host_state = lambda s: s

  return Trainer(mesh=mesh, objective=objective, state=state, frozen=frozen, update_fn=update_fn,
                 put_batch=put_batch, host_state=host_state, schedule=schedule)


def init_sharded(init_fn, rng, shardings, where: str = "auto", edit=None):
  """init_fn(rng) created directly in `shardings`.

  where: "device" compiles the initialiser for the accelerators (no host copy, any size); "host"
  runs it on the host CPU and places each shard (the same seed gives every process the same values);
  "auto" = host on GPUs, device elsewhere. XLA:GPU compiles random initialisers very slowly
  (measured on an H100: 57 s for a ViT-B, 5.9 s on the host), so GPUs default to the host path.
  edit: optional host function of the initial value (NumPy leaves) -> a value of the same tree and
  shapes, applied before placement (pretrained weights); it implies the host path.
  The initialiser runs once: it is compiled with xla_options.FAST_COMPILE (the same values).
  """
  if where not in ("auto", "host", "device"):
    raise ValueError(f"parallel.init_on must be auto, host or device, got {where!r}")
  if where == "auto":
    where = "host" if jax.default_backend() == "gpu" else "device"
  if where == "device" and edit is None:
    return jit_with_options(init_fn, FAST_COMPILE, out_shardings=shardings)(rng)
  cpu = jax.local_devices(backend="cpu")[0]
  with jax.default_device(cpu):
    host = jax.device_get(jit_with_options(init_fn, FAST_COMPILE)(jax.device_put(rng, cpu)))
  if edit is not None:
    edited = edit(host)
    shape = lambda t: jax.tree.map(lambda x: (np.shape(x), np.asarray(x).dtype), t)
    if jax.tree.structure(edited) != jax.tree.structure(host) or shape(edited) != shape(host):
      raise ValueError("init_params changed the parameter tree, shapes or dtypes")
    host = edited
  return jax.tree.map(
      lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda idx: np.asarray(x)[idx]),
      host, shardings)


def _replicator(devices):
  """Host tree -> one copy per device, laid out for jax.pmap over `devices`."""
  place = jax.pmap(lambda x: x, devices=devices)
  n = len(devices)
  return lambda tree: place(jax.tree.map(lambda x: np.broadcast_to(x, (n,) + np.shape(x)), tree))


def _state_shardings(abstract_vars, abstract_state, tx, mesh, strategy):
  """Shardings of the whole TrainState: params by their logical names; optimizer moments like
  their params; everything else replicated."""
  var_shardings = mesh_lib.tree_shardings(abstract_vars, mesh, strategy)
  var_shardings = dict(var_shardings)
  param_shardings = var_shardings.pop("params")
  rep = mesh_lib.replicated(mesh)
  masked = lambda x: isinstance(x, optax.MaskedNode)  # multi_transform's other-group slots
  opt_shardings = optax.tree_map_params(
      tx, lambda v, s: v if masked(v) else s, abstract_state.opt_state, param_shardings,
      transform_non_params=lambda _: rep, is_leaf=masked)
  model_state_shardings = {k: var_shardings[k] for k in abstract_state.model_state}
  return TrainState(step=rep, params=param_shardings, opt_state=opt_shardings,
                    model_state=model_state_shardings, rng=rep)


def _install_sigterm(flag: dict):
  """SIGTERM (preemption notice) asks the loop to checkpoint and stop at the next step."""
  try:
    return signal.signal(signal.SIGTERM, lambda *_: flag.__setitem__("flag", True))
  except ValueError:  # Not the main thread.
    return None


def load_trained(workdir: str, step: int | None = None) -> dict:
  """Reads a finished stage's checkpoint on the default device: {"params", "model_state", "step",
  "config"} (config as the dict saved in workdir/config.json). Raises CheckpointError if absent."""
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  try:
    step = checkpointer.latest_step() if step is None else step
    if step is None:
      raise ckpt_lib.CheckpointError(f"no checkpoint in {workdir}/checkpoints: train that stage first")
    import orbax.checkpoint as ocp
    path = os.path.join(checkpointer.directory, str(step), "state")
    try:
      # A target on this process's first device: the checkpoint may come from any mesh.
      meta = ocp.StandardCheckpointer().metadata(path).item_metadata
      meta = getattr(meta, "tree", meta)
      device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta,
                            is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))
      restored = ocp.StandardCheckpointer().restore(path, target)
    except Exception as e:
      raise ckpt_lib.CheckpointError(
          f"cannot read checkpoint {workdir}/checkpoints/{step}: {type(e).__name__}: {e}") from e
  finally:
    checkpointer.close()
  with open(os.path.join(workdir, "config.json")) as f:
    config = json.load(f)
  return {"params": restored["params"], "model_state": restored.get("model_state", {}),
          "step": step, "config": config}
