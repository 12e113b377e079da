"""One process of a multi-process training run (started by launch/local.sh in test_multiprocess)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from vqkd_jax.parallel import distributed  # noqa: E402

distributed.initialize()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from toy_stage import toy_config, toy_objective  # noqa: E402
from vqkd_jax.train import loop  # noqa: E402

c = toy_config(total_steps=3, checkpoint_every=3)
r = loop.train(c, sys.argv[1], objective=toy_objective(c))
total = sum(float(np.asarray(multihost_utils.process_allgather(l, tiled=True), np.float64).sum())
            for l in jax.tree.leaves(r.state.params))
print(f"PROCESS {jax.process_index()} of {jax.process_count()} devices {jax.device_count()} "
      f"checksum {total!r}", flush=True)
