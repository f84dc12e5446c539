#!/usr/bin/env bash
# Denoiser memory and time against D (issue 21): both networks, sampling and
# a training step, one process per configuration (examples/scale.rs), on this
# machine's CPU. Prints a Markdown table (docs/BENCHMARKS.md).
# WEIGHTGEN_SCALE_MAX=N stops at D = N (default 10000000).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bootstrap.sh
cargo build --locked --release --example scale
max=${WEIGHTGEN_SCALE_MAX:-10000000}
run() {
  if [ "$2" -le "$max" ]; then
    target/release/examples/scale "$@"
  fi
}
echo "| network | D | measured | denoiser parameters | attention windows | peak RSS growth (MiB) | seconds per step |"
echo "|---|---|---|---|---|---|---|"
for d in 10000 100000 1000000 10000000; do
  run layer_transformer "$d" sample
done
# The MLP U-Net at D = 10⁷ would hold 2 · 512 · D ≈ 10¹⁰ parameters (41 GB).
for d in 10000 100000 1000000; do
  run mlp_unet "$d" sample
done
for d in 10000 100000 1000000; do
  run layer_transformer "$d" train
done
for d in 1000000 10000000; do
  run layer_transformer "$d" train 16
done
# At D = 10⁶ its parameters, gradients and Adam moments alone are 16 GB.
for d in 10000 100000; do
  run mlp_unet "$d" train
done
