#!/usr/bin/env bash
# Issue 21, item 4: the permutation-equivariant denoiser against weight
# matching. Builds a `digits` zoo whose models start from independent inits
# (so each sits in its own permutation of the hidden units), trains on it
# with one recipe
#   eq-units     unit transformer (one token per hidden unit), not aligned
#   eq-units-wm  unit transformer on the zoo aligned by weight matching
#   eq-chunks    layer transformer (chunk tokens), not aligned
#   eq-mlp-wm    MLP U-Net on the aligned zoo (what weightgen did before)
#   eq-mlp       MLP U-Net, not aligned
# and the first and fourth again with --seed 1 (eq-units-s1, eq-mlp-wm-s1:
# how much of a row is the run's luck), then runs the harness's ablation
# table on held-out tasks and the harness's full report for eq-units (every
# request form, nearest zoo model, zoo average, hypernetwork).
# Settings (environment):
#   WEIGHTGEN_BIN          binaries (default target/release, built when missing)
#   WEIGHTGEN_EQ_DATA      data dir (default ./weightgen-equivariance-data)
#   WEIGHTGEN_EQ_STEPS     training steps of every denoiser (default 6000)
#   WEIGHTGEN_EQ_OUTPUT    Markdown file the harness writes its table into
#                          (default: a file in the data dir)
set -euo pipefail
cd "$(dirname "$0")/.."
step() { echo "[equivariance] $* ($(date +%T))"; }

bin="${WEIGHTGEN_BIN:-target/release}"
data="${WEIGHTGEN_EQ_DATA:-./weightgen-equivariance-data}"
steps="${WEIGHTGEN_EQ_STEPS:-6000}"
mkdir -p "$data"
out="${WEIGHTGEN_EQ_OUTPUT:-$data/report.md}"
if [ ! -x "$bin/weightgen-worker" ]; then
    . scripts/bootstrap.sh >/dev/null
    step "cargo build --release"
    cargo build --release --locked --bins
fi
worker() { "$bin/weightgen-worker" "$@" --data-dir "$data"; }

step "zoo eq-indep: 1000 digits MLPs 64-32-5 from independent inits"
worker zoo build --family digits --zoo eq-indep --models 1000 --steps 100 2>"$data/zoo.log"

# The raw-weight recipe (v, lr 1e-3, EMA 0.995; RESULTS.md), in weight
# space: unit tokens are made of the weights themselves. One intra-op
# thread each, two denoisers at a time (2 cores).
train() { # id [flags]
    local id="$1" log="$data/train-$1.log"
    shift
    step "denoiser $id: $steps steps $*"
    worker train --zoo eq-indep --denoiser-id "$id" --steps "$steps" --latent none --prediction v \
        --learning-rate 1e-3 --ema-decay 0.995 --eval-tasks 10 --eval-guidance 3 --log-every 500 \
        --device cpu --threads 1 "$@" 2>"$log.new" >"$data/gate-$id.txt" || {
        grep -q "already exists" "$log.new" && rm "$log.new" && step "($id is already published)" && return
        tail -5 "$log.new" >&2
        return 1
    }
    mv "$log.new" "$log"
    step "$id: $(tail -1 "$data/gate-$id.txt")"
}
pair() { # "id flags" "id flags"
    train $1 & local first=$!
    train $2 & local second=$!
    wait "$first"
    wait "$second"
}
pair "eq-units --kind unit_transformer --align never" "eq-chunks --kind layer_transformer --align never"
pair "eq-units-wm --kind unit_transformer --align always" "eq-mlp-wm --widths 256,128 --align always"
pair "eq-mlp --widths 256,128 --align never" "eq-mlp-wm-s1 --widths 256,128 --align always --seed 1"
train eq-units-s1 --kind unit_transformer --align never --seed 1

step "harness: ablation table on held-out tasks"
worker eval --zoo eq-indep --tasks 10 --seeds 2 --threads 2 --output "$out" \
    --methods weightgen-features-only,weightgen-support-only,weightgen-wrong-task \
    --ablation eq-units,eq-units-s1,eq-units-wm,eq-chunks,eq-mlp-wm,eq-mlp-wm-s1,eq-mlp \
    2>"$data/eval.log" | tail -10
step "harness: eq-units against the baselines (20 held-out tasks x 3 seeds)"
worker eval --zoo eq-indep --denoiser-id eq-units --threads 2 --output "$out" \
    --methods weightgen-ddim-guided,weightgen-features-only,weightgen-support-only,weightgen-wrong-task,nearest-zoo,zoo-average,hypernetwork \
    2>"$data/eval-units.log" >/dev/null
step "done: $out"
