#!/usr/bin/env bash
# Runs one vqkd command on every worker of a TPU VM slice (jax.distributed finds its peers itself).
#   launch/tpu_vm.sh TPU_NAME ZONE "vqkd train --config configs/imagenet/vqkd_clip.py --workdir gs://bucket/run"
# Assumes the repository is checked out at ~/vqkd_jax on every worker (see `setup` below).
set -euo pipefail
tpu=${1:?TPU name}; zone=${2:?zone}; cmd=${3:?command}
if [[ "${SETUP:-0}" == 1 ]]; then
  gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command \
    "cd ~/vqkd_jax && python3 -m venv .venv && .venv/bin/pip install -q -c constraints.txt -e '.[data]' 'jax[tpu]'"
fi
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command \
  "cd ~/vqkd_jax && VQKD_DISTRIBUTED=1 .venv/bin/$cmd"
