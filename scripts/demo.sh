#!/usr/bin/env bash
# The main job on embedded defaults: builds everything (release), builds
# model zoos into ./weightgen-data (SQLite catalog + blob directory;
# re-running continues or finds them complete), trains a small digits
# denoiser on its zoo, scores it zero-shot and publishes it as active,
# starts weightgen-server on that data dir, requests inits for held-out
# tasks over gRPC and fine-tunes them next to random inits (`weightgen
# compare`: zero-shot accuracy and steps to 90% of the fully trained
# accuracy), shows health and metrics, and stops the server with SIGTERM.
# WEIGHTGEN_DEMO_RECIPE picks the denoiser: `shared` (default, minutes: a
# 1,000-model shared-init zoo and an MLP U-Net in a PCA latent; level with
# the task->weights regression baseline) or `units` (about 14 minutes on 2
# cores: a 4,000-model zoo of independent inits and the permutation-
# equivariant unit transformer, whose weights score above that baseline and
# the nearest zoo model; docs/RESULTS.md). WEIGHTGEN_DEMO_MODELS sets the
# digits zoo size (default 1000, units 4000), WEIGHTGEN_DEMO_STEPS the
# denoiser's training steps (default 10000, units 12000),
# WEIGHTGEN_DEMO_TASKS the number of held-out tasks compared (default 8).
set -euo pipefail
cd "$(dirname "$0")/.."
step() { echo "[demo] $*"; }

step "bootstrap"
. scripts/bootstrap.sh

step "cargo build --release"
cargo build --release --locked --bins

bin="${CARGO_TARGET_DIR:-target}/release"
data="${WEIGHTGEN_DATA_DIR:-./weightgen-data}"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
grpc_port="${WEIGHTGEN_DEMO_PORT:-$(free_port)}"
metrics_port="$(free_port)"
addr="127.0.0.1:$grpc_port"
log="$data/server.log"
mkdir -p "$data"
recipe="${WEIGHTGEN_DEMO_RECIPE:-shared}"
case "$recipe" in
shared)
    models="${WEIGHTGEN_DEMO_MODELS:-1000}"
    steps="${WEIGHTGEN_DEMO_STEPS:-10000}"
    step "zoo: $models digits models from one shared init (weightgen-worker zoo build, data dir $data)"
    zoo=digits-demo
    "$bin/weightgen-worker" zoo build --family digits --zoo "$zoo" --models "$models" --shared-init \
        --steps 100 --data-dir "$data" 2>"$data/zoo-digits.log"
    id="digits-demo-v5-$steps"
    # One intra-op thread: this small denoiser trains faster so (BENCHMARKS.md).
    # v-prediction, and widths 128/64 for 10,000 steps in the time 256/128 took
    # for 6,000: chosen on the validation gate (docs/RESULTS.md).
    recipe_flags=(--widths 128,64 --eval-tasks 30 --threads 1)
    ;;
units)
    models="${WEIGHTGEN_DEMO_MODELS:-4000}"
    steps="${WEIGHTGEN_DEMO_STEPS:-12000}"
    step "zoo: $models digits models from independent inits (weightgen-worker zoo build, data dir $data)"
    zoo=digits-units
    "$bin/weightgen-worker" zoo build --family digits --zoo "$zoo" --models "$models" \
        --steps 100 --jobs 2 --data-dir "$data" 2>"$data/zoo-digits.log"
    id="digits-units-v2-$steps"
    # Unit tokens on the raw weights (no latent, no alignment: the network is
    # equivariant to the units' order); depth 2 and weight decay 0.1 score as
    # depth 4 without decay on the validation tasks at half the time a step
    # (docs/RESULTS.md, first section).
    recipe_flags=(--kind unit_transformer --latent none --align never --transformer-depth 2
        --weight-decay 0.1 --eval-tasks 10 --threads 2)
    ;;
*)
    echo "WEIGHTGEN_DEMO_RECIPE must be shared or units, not '$recipe'" >&2
    exit 2
    ;;
esac

step "denoiser ($recipe): $steps steps on the digits zoo, zero-shot quality gate, publish as active (log $data/train.log)"
"$bin/weightgen-worker" train --zoo "$zoo" --denoiser-id "$id" --steps "$steps" \
    --prediction v --learning-rate 1e-3 --ema-decay 0.995 --eval-guidance 3 "${recipe_flags[@]}" \
    --log-every 500 --device cpu --activate --data-dir "$data" 2>"$data/train.log" || {
    # Re-running the demo: this version is already published.
    grep -q "already exists" "$data/train.log" && step "($id is already published)" || exit 1
}
step "starting weightgen-server on $addr (data dir $data, log $log)"
"$bin/weightgen-server" --listen "$addr" --metrics-listen "127.0.0.1:$metrics_port" \
    --data-dir "$data" --device auto --reload-interval 1s 2>"$log" &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT

step "waiting until the server has loaded the active denoiser (GenerationService SERVING)"
"$bin/weightgen" --addr "$addr" health --service weightgen.v1.GenerationService --wait 60s
# Both recipes on one data dir: serve this recipe's denoiser (a no-op when it
# is already the active one; the server swaps it in at its next catalog check).
"$bin/weightgen" --addr "$addr" denoisers activate "$id" >/dev/null && sleep 2
"$bin/weightgen" --addr "$addr" server-info
for service in weightgen.v1.CatalogService weightgen.v1.JobService; do
    "$bin/weightgen" --addr "$addr" health --service "$service" || true
done

held_out="${WEIGHTGEN_DEMO_TASKS:-8}"
for form in features both; do
    step "held-out tasks: $held_out inits over gRPC (the denoiser's recommended sampler, guidance 3, request with $form), fine-tuned next to random init"
    "$bin/weightgen" --addr "$addr" --timeout 120s compare --family digits --held-out "$held_out" --seed 1 \
        --guidance 3 --learning-rate 1e-3 --finetune-steps 300 --full-steps 1000 --form "$form"
done

step "metrics on 127.0.0.1:$metrics_port/metrics:"
python3 - "$metrics_port" <<'PY'
import sys, urllib.request
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=5).read().decode()
for line in text.splitlines():
    if line.startswith(("weightgen_grpc_requests_total", "weightgen_build_info", "weightgen_denoiser_version",
                        "weightgen_batch_samples_count", "weightgen_sampling_seconds_sum")):
        print("  " + line)
PY

step "stopping the server (SIGTERM)"
kill -TERM "$pid"
wait "$pid"
trap - EXIT
step "server stopped cleanly; log in $log"
