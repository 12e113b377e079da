#!/usr/bin/env bash
# ImageNet-size benchmarks on one accelerator: random weights, synthetic data, bf16; each prints
# `vqkd bench`'s table (step time, images/s, TFLOP/s and MFU against PEAK_TFLOPS).
#
#   launch/bench_imagenet.sh tokenizers   # one training step of every tokenizer + pixel decoder
#   launch/bench_imagenet.sh proposal     # AR (GPT-2 / Llama medium) training, AR and NAR sampling
#   launch/bench_imagenet.sh fid          # FID Inception forward (exact / fast / tf32 / bf16) + drift
#   launch/bench_imagenet.sh all
#
# Batches are per device as upstream's global batches on 8 GPUs (VQGAN / FSQ 96 -> 12, VQ-KD
# 512 -> 64, Cluster 256 -> 32, pixel decoder 128 -> 16), then at a larger batch where the small
# one leaves the GPU idle. VQKD overrides the command (default `vqkd`; on a machine without the
# package installed: VQKD="python3 -m vqkd_jax.cli").
set -euo pipefail
what=${1:-all}
VQKD=${VQKD:-vqkd}
PEAK=${PEAK_TFLOPS:-780}
STEPS=${STEPS:-10}
TMP=${TMPDIR:-/tmp}/vqkd_bench.$$
# One failing benchmark is reported and the others still run; the exit status says if any failed.
failed=0
bench() {
  echo "+ vqkd bench $*"
  $VQKD bench "$@" --steps "$STEPS" --peak_tflops "$PEAK" || { echo "FAILED: $*"; failed=1; }
}

tokenizers() {
  bench train --config configs/imagenet/vqgan.py:codes=8192 --config.batch_size=12 \
    --config.loss.perceptual.weights=random
  bench train --config configs/imagenet/vqgan.py:codes=8192 --config.batch_size=48 \
    --config.loss.perceptual.weights=random
  bench train --config configs/imagenet/vqgan.py:codes=8000 --config.batch_size=12 \
    --config.loss.perceptual.weights=random
  bench train --config configs/imagenet/vqgan.py:codes=64000 --config.batch_size=12 \
    --config.loss.perceptual.weights=random
  bench train --config configs/imagenet/vqkd.py:teacher=random --config.batch_size=64
  bench train --config configs/imagenet/vqkd.py:teacher=random --config.batch_size=256
  bench train --config configs/imagenet/cluster.py:teacher=random --config.batch_size=32
  bench train --config configs/imagenet/cluster.py:teacher=random --config.batch_size=256
  # The pixel decoder reads a trained tokenizer's work directory: one synthetic step of VQ-KD.
  $VQKD train --config configs/imagenet/vqkd.py:teacher=random --workdir "$TMP/vqkd" \
    --config.data.synthetic=True --config.total_steps=1 --config.batch_size=8 \
    --config.eval_every=0 --config.checkpoint_every=1 --config.log_every=1 > /dev/null
  bench train --config configs/imagenet/pixel_decoder.py:code_dim=32 --config.batch_size=16 \
    --config.tokenizer_workdir="$TMP/vqkd" --config.loss.perceptual.weights=random \
    --config.gan.start=0
  bench train --config configs/imagenet/pixel_decoder.py:code_dim=32 --config.batch_size=64 \
    --config.tokenizer_workdir="$TMP/vqkd" --config.loss.perceptual.weights=random \
    --config.gan.start=0
}

proposal() {
  if [ -f configs/imagenet/ar.py ]; then
    bench train --config configs/imagenet/ar.py:variant=gpt2 --config.batch_size=96
    bench train --config configs/imagenet/ar.py:variant=llama --config.batch_size=96
    bench sample --config configs/imagenet/ar.py:variant=llama --config.batch_size=64
    bench sample --config configs/imagenet/ar.py:variant=llama --config.batch_size=512
  fi
  bench sample --config configs/imagenet/nar.py --config.bench.batch_size=64
  bench sample --config configs/imagenet/nar.py --config.bench.batch_size=256
}

fid() {
  for mode in exact fast tf32 bf16; do
    bench fid --batch 256 --mode "$mode"
  done
}

case $what in
  tokenizers) tokenizers ;;
  proposal) proposal ;;
  fid) fid ;;
  all) tokenizers; proposal; fid ;;
  *) echo "usage: $0 tokenizers|proposal|fid|all" >&2; exit 2 ;;
esac
rm -rf "$TMP"
exit $failed
