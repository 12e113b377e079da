#!/usr/bin/env bash
# Several processes on this machine, each a JAX process of one multi-process job (tests of
# multi-host code paths, or one process per GPU). Usage:
#   launch/local.sh NUM_PROCESSES vqkd train --config configs/demo/vqkd.py --workdir runs/x
# Each process gets JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, which
# vqkd_jax.parallel.distributed.initialize() reads. On CPU, set XLA_FLAGS for several devices each.
set -euo pipefail
n=${1:?number of processes}; shift
port=${JAX_COORDINATOR_PORT:-$((20000 + RANDOM % 20000))}
pids=()
for ((i = 0; i < n; i++)); do
  JAX_COORDINATOR_ADDRESS=127.0.0.1:$port JAX_NUM_PROCESSES=$n JAX_PROCESS_ID=$i "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
