#!/usr/bin/env bash
# The full evaluation profile behind docs/RESULTS.md: builds a zoo per family
# (and an independent-init digits zoo for the alignment ablation), trains a
# denoiser per family, runs `weightgen-worker eval` on each, then trains the
# ablation denoisers (one design choice changed each) and evaluates them as
# one table per zoo. Every section of the output file is replaced in place.
#
# Re-running reuses the zoos and the published denoisers of the data dir
# (`eval` refuses a zoo holding held-out tasks, e.g. a sinusoid zoo built
# before the interpolation split existed: delete it and re-run).
# Settings (environment):
#   WEIGHTGEN_BIN            binaries (default target/release, built when missing)
#   WEIGHTGEN_EVAL_DATA      data dir (default ./weightgen-eval-data)
#   WEIGHTGEN_EVAL_OUTPUT    Markdown file (default docs/RESULTS.md)
#   WEIGHTGEN_EVAL_STEPS     training steps of the main denoisers (default 4000)
#   WEIGHTGEN_ABLATION_STEPS training steps of each ablation denoiser (default 2000)
#   WEIGHTGEN_EVAL_ONLY      "main", "ablation" or empty for both
#   WEIGHTGEN_EVAL_ZOOS      main reports to run (default: every zoo below)
set -euo pipefail
cd "$(dirname "$0")/.."
step() { echo "[eval-all] $* ($(date +%T))"; }

bin="${WEIGHTGEN_BIN:-target/release}"
data="${WEIGHTGEN_EVAL_DATA:-./weightgen-eval-data}"
out="${WEIGHTGEN_EVAL_OUTPUT:-docs/RESULTS.md}"
steps="${WEIGHTGEN_EVAL_STEPS:-4000}"
ablation_steps="${WEIGHTGEN_ABLATION_STEPS:-2000}"
only="${WEIGHTGEN_EVAL_ONLY:-}"
mkdir -p "$data"

if [ ! -x "$bin/weightgen-worker" ]; then
    . scripts/bootstrap.sh >/dev/null
    step "cargo build --release"
    cargo build --release --locked --bins
fi
worker() { "$bin/weightgen-worker" "$@" --data-dir "$data"; }

zoo() { # name family models [flags]
    local name="$1" family="$2" models="$3"
    shift 3
    step "zoo $name: $models $family models $*"
    worker zoo build --family "$family" --zoo "$name" --models "$models" "$@" 2>"$data/zoo-$name.log"
}

# Trains and publishes denoiser ID on ZOO; an already published ID is kept
# (and so is the log of its training).
train() { # id zoo steps widths [flags]
    local id="$1" zoo="$2" n="$3" widths="$4" log="$data/train-$1.log"
    shift 4
    step "denoiser $id on $zoo: $n steps, widths $widths $*"
    worker train --zoo "$zoo" --denoiser-id "$id" --steps "$n" --learning-rate 1e-3 --widths "$widths" \
        --ema-decay 0.995 --eval-tasks 10 --eval-guidance 3 --log-every 500 --device cpu "$@" \
        2>"$log.new" | tail -1 || {
        grep -q "already exists" "$log.new" && rm "$log.new" && step "($id is already published)" && return
        tail -5 "$log.new" >&2
        exit 1
    }
    mv "$log.new" "$log"
}

zoos="${WEIGHTGEN_EVAL_ZOOS:-digits-eval sinusoid-shared digit-inr-eval digit-inr-shared words-600}"
wants() { [[ " $zoos " == *" $1 "* ]]; }
wants digits-eval || [ "$only" != main ] && zoo digits-eval digits 1000 --shared-init --steps 100
# sinusoid from one shared init: chosen on the validation gate over the
# independent-init zoo (docs/RESULTS.md, "Fair splits").
wants sinusoid-shared && zoo sinusoid-shared sinusoid 1000 --shared-init
wants digit-inr-eval && zoo digit-inr-eval digit-inr 1000
# digit-inr from one shared init (the independent-init zoo is multimodal).
wants digit-inr-shared && zoo digit-inr-shared digit-inr 1000 --shared-init
# words: 600 LoRA adapters of the default base (the base is trained first,
# once, as its own one-model zoo; ≈ 16 min on 2 cores).
wants words-600 && zoo words-600 words 600 --shared-init --seed 7

report() { # zoo [split]: evaluates ZOO's denoiser (ZOO minus -eval, then -STEPS)
    local zoo="$1" id="$(denoiser_id "$1")" split="${2:-interpolation}"
    step "eval $zoo, $split split (full profile)"
    # shellcheck disable=SC2046
    worker eval --zoo "$zoo" --denoiser-id "$id" --split "$split" --output "$out" $(report_flags "$zoo") \
        2>"$data/eval-$zoo-$split.log" |
        grep -E "^\| (weightgen|random|nearest|average|Reptile|first-order|hypernetwork)" | head -20
}

# Per-zoo recipes, each chosen on that zoo's validation gate (docs/RESULTS.md):
# v-prediction on digits; on the shared-init sinusoid and digit-inr zoos the
# demo's recipe (v-prediction, widths 128/64, 10,000 steps) sampled by one
# x̂₀ step from t = T (validation MSE 0.55 against 4.80 for the old recipe's
# DDIM-50 on sinusoid; 0.012 against 0.054 on digit-inr).
# On words-600 the recipe of docs/RESULTS.md's first words denoiser (v,
# 128/64, 4,000 steps).
recipe_steps() { # zoo
    case "$1" in
        sinusoid-shared | digit-inr-shared) echo 10000 ;;
        words-600) echo 4000 ;;
        *) echo "$steps" ;;
    esac
}
recipe_widths() { # zoo
    case "$1" in
        sinusoid-shared | digit-inr-shared | words-600) echo 128,64 ;;
        *) echo 256,128 ;;
    esac
}
recipe() { # zoo: further training flags
    case "$1" in
        digits-eval) echo "--prediction v" ;;
        # One intra-op thread, as measured (training is bit-reproducible so).
        sinusoid-shared | digit-inr-shared | words-600) echo "--prediction v --threads 1" ;;
    esac
}
report_flags() { # zoo: the sampler of its report's weightgen rows
    case "$1" in
        sinusoid-shared | digit-inr-shared) echo "--sampler one-step --guidance 1" ;;
        # The sampler its gate recommends (DDIM-10, guidance 3: what a request
        # that leaves the sampler unset gets). An adapter's fine-tuning runs
        # through the base: 10 tasks × 2 seeds and the rows that differ.
        words-600) echo "--sampler ddim-10 --guidance 3 --tasks 10 --seeds 2 --methods $words_methods" ;;
    esac
}
words_methods=weightgen-ddim-guided,weightgen-features-only,weightgen-support-only,weightgen-wrong-task,\
nearest-zoo,zoo-average,reptile,hypernetwork
denoiser_id() { # zoo: its main denoiser's id
    case "$1" in
        words-600) echo words-4000 ;;
        *) echo "${1%-eval}-$(recipe_steps "$1")" ;;
    esac
}

if [ "$only" != ablation ]; then
    for zoo in $zoos; do
        # shellcheck disable=SC2046
        train "$(denoiser_id "$zoo")" "$zoo" "$(recipe_steps "$zoo")" "$(recipe_widths "$zoo")" \
            $(recipe "$zoo")
        report "$zoo"
    done
    # sinusoid's second split: held-out tasks outside the zoo's range.
    if wants sinusoid-shared; then report sinusoid-shared extrapolation; fi
fi

if [ "$only" != main ]; then
    # One choice changed per row, against the baseline abl-base (the main
    # recipe at the ablation's step count).
    train abl-base digits-eval "$ablation_steps" 256,128
    train abl-t100 digits-eval "$ablation_steps" 256,128 --timesteps 100
    train abl-linear digits-eval "$ablation_steps" 256,128 --schedule linear
    # ε like abl-base (the transformer's own default is v).
    train abl-transformer digits-eval "$ablation_steps" 256,128 --kind layer_transformer --prediction epsilon
    train abl-concat digits-eval "$ablation_steps" 256,128 --conditioning concat
    train abl-e16 digits-eval "$ablation_steps" 256,128 --embed-dim 16
    train abl-e256 digits-eval "$ablation_steps" 256,128 --embed-dim 256
    train abl-zoo250 digits-eval "$ablation_steps" 256,128 --max-models 250
    train abl-fdrop digits-eval "$ablation_steps" 256,128 --feature-dropout 0.3
    train abl-ae64 digits-eval "$ablation_steps" 256,128 --latent ae:64
    step "eval ablations on digits-eval"
    worker eval --zoo digits-eval --tasks 10 --seeds 2 --output "$out" \
        --methods weightgen-features-only,weightgen-support-only,weightgen-wrong-task \
        --ablation abl-base,abl-t100,abl-linear,abl-transformer,abl-concat,abl-e16,abl-e256,abl-zoo250,abl-fdrop,abl-ae64 \
        2>"$data/eval-ablation.log" | tail -14

    # Alignment matters only when models start from different inits.
    zoo digits-indep digits 1000 --steps 100
    train abl-aligned digits-indep "$ablation_steps" 256,128 --align always
    train abl-unaligned digits-indep "$ablation_steps" 256,128 --align never
    step "eval alignment ablation on digits-indep"
    worker eval --zoo digits-indep --tasks 10 --seeds 2 --output "$out" --ablation abl-aligned,abl-unaligned \
        --methods weightgen-features-only,weightgen-support-only,weightgen-wrong-task \
        2>"$data/eval-ablation-indep.log" | tail -5
fi
step "done: $out"
