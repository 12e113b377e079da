"""Multi-process JAX: initialise `jax.distributed` from the environment set by `launch/`."""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)


def initialize() -> None:
  """Calls jax.distributed.initialize when the launch scripts asked for it.

  JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (launch/local.sh, launch/slurm.sbatch)
  give explicit arguments; VQKD_DISTRIBUTED=1 (TPU VMs) lets JAX discover its peers. Otherwise this is
  a single-process run and nothing happens.
  """
  address = os.environ.get("JAX_COORDINATOR_ADDRESS")
  if address:
    jax.distributed.initialize(
        coordinator_address=address, num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
        process_id=int(os.environ["JAX_PROCESS_ID"]))
  elif os.environ.get("VQKD_DISTRIBUTED") == "1":
    jax.distributed.initialize()
  else:
    return
  log.info("process %d of %d, %d local / %d global devices", jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())
