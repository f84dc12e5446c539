#!/usr/bin/env bash
# The CUDA path, on a machine with an NVIDIA GPU and PyTorch 2.11 installed.
#
# 1. Data: a 300-model digits zoo and a 2,000-step denoiser trained on the
#    GPU (fp16 autocast) — or, with WEIGHTGEN_GPU_CHECK_DATA, a data dir
#    prepared elsewhere (saves device time).
# 2. Three servers over the same data: cuda:0 with CUDA graphs (the
#    default), cuda:0 with --cuda-graphs false, and the CPU.
# 3. The same requests, same seeds, on each: DDIM-50 and DDPM-1000 with 64
#    samples (samples/s, zero-shot accuracy; graphs vs eager must give the
#    same weights, GPU vs CPU the same up to float rounding); then the
#    latency of DDIM-50 and DPM-Solver-10 requests of 1 … 1,024 samples
#    with and without graphs (median of 3 after a warm-up that records
#    the bucket's graph); GPU memory; and one run under libtorch's sync
#    debugging, which lists every operation that made the host wait.
# 4. WEIGHTGEN_GPU_CHECK_MORE="name=DATA_DIR …": more prepared data dirs (one
#    active denoiser each, e.g. a PCA-latent one and a layer transformer),
#    each served with and without graphs: same weights? latency at 1 and 64
#    samples. WEIGHTGEN_GPU_CHECK_MAIN=0 skips 1–3 (and needs no CPU server).
# 5. WEIGHTGEN_GPU_CHECK_TRAIN_STEPS=N: times N training steps of the MLP
#    U-Net 256/128 on the GPU (fp16 autocast) on the main zoo.
#
# Binaries: $WEIGHTGEN_BIN (default target/release; built with cargo when
# missing and cargo exists — a GPU machine without Rust gets them copied in).
# libtorch: the python3 on PATH's torch (its lib/ goes on LD_LIBRARY_PATH).
# WEIGHTGEN_GPU_DEVICE=cpu runs the same script on the CPU (a dry run of the
# plumbing on a machine without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
step() { echo "[gpu-check] $*"; }

gpu="${WEIGHTGEN_GPU_DEVICE:-cuda:0}"
bin="${WEIGHTGEN_BIN:-target/release}"
work="${WEIGHTGEN_GPU_CHECK_DIR:-$(mktemp -d)}"
samples="${WEIGHTGEN_GPU_CHECK_SAMPLES:-64}"
sizes="${WEIGHTGEN_GPU_CHECK_SIZES:-1 8 64 256 1024}"
py="${PYTHON:-python3}"
mkdir -p "$work"

torch_lib="$("$py" -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
step "torch $("$py" -c 'import torch; print(torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")') at $torch_lib"

if [ ! -x "$bin/weightgen-server" ]; then
    command -v cargo >/dev/null || { step "no binaries in $bin and no cargo: set WEIGHTGEN_BIN" >&2; exit 1; }
    step "building release binaries"
    . scripts/bootstrap.sh >/dev/null
    cargo build --release --locked --bins
fi
"$bin/weightgen-worker" check-device --device "$gpu"

main="${WEIGHTGEN_GPU_CHECK_MAIN:-1}"
if [ -n "${WEIGHTGEN_GPU_CHECK_DATA:-}" ]; then
    data="$work/data"
    rm -rf "$data"
    cp -r "$WEIGHTGEN_GPU_CHECK_DATA" "$data"
    step "data prepared elsewhere: $WEIGHTGEN_GPU_CHECK_DATA"
else
    data="$work/data"
    step "zoo: 300 digits models on $gpu (data $data)"
    "$bin/weightgen-worker" zoo build --family digits --zoo digits-gpu --models 300 --shared-init --steps 100 \
        --device "$gpu" --data-dir "$data" 2>"$work/zoo.log"
    step "denoiser: 2000 steps on $gpu, mixed precision where CUDA"
    "$bin/weightgen-worker" train --zoo digits-gpu --denoiser-id digits-gpu-check --steps 2000 --learning-rate 1e-3 \
        --widths 256,128 --ema-decay 0.995 --eval-tasks 10 --eval-guidance 3 --precision auto --device "$gpu" \
        --activate --data-dir "$data" 2>"$work/train.log" | tail -1
fi

free_port() { "$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
start() { # name device port extra-flags...
    local name="$1" device="$2" port="$3"
    shift 3
    "$bin/weightgen-server" --listen "127.0.0.1:$port" --metrics-listen "127.0.0.1:0" --data-dir "$data" \
        --device "$device" "$@" 2>"$work/server-$name.log" &
    pids+=($!)
    "$bin/weightgen" --addr "127.0.0.1:$port" health --service weightgen.v1.GenerationService --wait 120s >/dev/null
}
declare -A port
big=(--max-samples 1024 --max-batch 1024 --max-active 2048)
"$bin/weightgen" task --family digits --held-out-seed 7 -o "$work/task.json"

# generate ROLE OUT SAMPLES SEED SAMPLER [flags]: prints the server's sampling ms.
generate() {
    local role="$1" out="$2" n="$3" seed="$4"
    shift 4
    local line
    line="$("$bin/weightgen" --addr "127.0.0.1:${port[$role]}" --timeout 600s generate --task "$work/task.json" \
        --samples "$n" --guidance 3 --seed "$seed" -o "$out" "$@" | tail -1)"
    sed -n 's/.*sampling \([0-9.]*\) ms.*/\1/p' <<<"$line"
}

if [ -n "${WEIGHTGEN_GPU_CHECK_TRAIN_STEPS:-}" ]; then
    cp -r "$data" "$work/train-data"
    step "training ${WEIGHTGEN_GPU_CHECK_TRAIN_STEPS} steps of an MLP U-Net 256/128 on $gpu (fp16 autocast)"
    t0="$(date +%s.%N)"
    "$bin/weightgen-worker" train --zoo digits-gpu --denoiser-id digits-gpu-train --steps "$WEIGHTGEN_GPU_CHECK_TRAIN_STEPS" \
        --learning-rate 1e-3 --widths 256,128 --eval-tasks 4 --precision auto --device "$gpu" \
        --data-dir "$work/train-data" 2>"$work/train-time.log" | tail -1 | cut -c1-200
    t1="$(date +%s.%N)"
    step "trained in $("$py" -c "print(round($t1 - $t0, 1))") s (start-up, evaluation and publishing included)"
fi

# More denoisers, graphs against eager on each.
for entry in ${WEIGHTGEN_GPU_CHECK_MORE:-}; do
    name="${entry%%=*}"
    data="$work/more-$name"
    rm -rf "$data"
    cp -r "${entry#*=}" "$data"
    for role in graphs eager; do port[$name-$role]="$(free_port)"; done
    start "$name-graphs" "$gpu" "${port[$name-graphs]}" "${big[@]}"
    start "$name-eager" "$gpu" "${port[$name-eager]}" "${big[@]}" --cuda-graphs false
    "$bin/weightgen" --addr "127.0.0.1:${port[$name-graphs]}" denoisers list 2>/dev/null | head -3 || true
    for role in graphs eager; do
        mkdir -p "$work/$name-$role"
        generate "$name-$role" "$work/$name-$role/w.safetensors" 64 99 --sampler ddim --steps 50 >/dev/null
        generate "$name-$role" "$work/$name-$role/init.safetensors" 64 1 --sampler ddim --steps 50 >/dev/null
    done
    if cmp -s <(cat "$work/$name-graphs"/init-*.safetensors) <(cat "$work/$name-eager"/init-*.safetensors); then
        same="bit-identical"
    else
        same="DIFFER"
    fi
    step "$name: 64 DDIM-50 samples, graphs vs eager: $same"
    for spec in "ddim 50" "dpm-solver 10"; do
        set -- $spec
        for n in 1 64; do
            line="$name $1-$2 $n samples:"
            for role in graphs eager; do
                generate "$name-$role" "$work/lat.safetensors" "$n" 5 --sampler "$1" --steps "$2" >/dev/null
                a="$(generate "$name-$role" "$work/lat.safetensors" "$n" 6 --sampler "$1" --steps "$2")"
                b="$(generate "$name-$role" "$work/lat.safetensors" "$n" 7 --sampler "$1" --steps "$2")"
                c="$(generate "$name-$role" "$work/lat.safetensors" "$n" 8 --sampler "$1" --steps "$2")"
                line="$line $role $(printf '%s\n' "$a" "$b" "$c" | sort -g | sed -n 2p) ms ($a $b $c)"
            done
            step "$line"
        done
    done
    grep -i "graph" "$work/server-$name-graphs.log" | cut -c1-200 || true
    rm -f "$work"/lat*.safetensors
done

[ "$main" = 1 ] || { step "done (work dir $work)"; exit 0; }
data="$work/data"
for role in graphs eager cpu; do port[$role]="$(free_port)"; done
start graphs "$gpu" "${port[graphs]}" "${big[@]}"
start eager "$gpu" "${port[eager]}" "${big[@]}" --cuda-graphs false
start cpu cpu "${port[cpu]}" --max-samples "$samples"
"$bin/weightgen" --addr "127.0.0.1:${port[graphs]}" server-info

results="$work/results.tsv"
: >"$results"
for sampler in ddim ddpm; do
    flags=(--sampler "$sampler")
    [ "$sampler" = ddim ] && flags+=(--steps 50)
    for role in graphs eager cpu; do
        out="$work/$sampler-$role"
        mkdir -p "$out"
        generate "$role" "$out/warmup.safetensors" "$samples" 99 "${flags[@]}" >/dev/null
        ms="$(generate "$role" "$out/init.safetensors" "$samples" 1 "${flags[@]}")"
        printf '%s\t%s\t%s\t%s\n' "$role" "$sampler" "$ms" "$out" >>"$results"
    done
done

# Latency against batch size, graphs vs eager: median of 3 after a warm-up.
latency="$work/latency.tsv"
: >"$latency"
median3() { printf '%s\n' "$@" | sort -g | sed -n 2p; }
for spec in "ddim 50" "dpm-solver 10"; do
    set -- $spec
    for n in $sizes; do
        for role in graphs eager; do
            generate "$role" "$work/lat.safetensors" "$n" 5 --sampler "$1" --steps "$2" >/dev/null
            a="$(generate "$role" "$work/lat.safetensors" "$n" 6 --sampler "$1" --steps "$2")"
            b="$(generate "$role" "$work/lat.safetensors" "$n" 7 --sampler "$1" --steps "$2")"
            c="$(generate "$role" "$work/lat.safetensors" "$n" 8 --sampler "$1" --steps "$2")"
            printf '%s\t%s\t%s\t%s\t%s\n' "$1-$2" "$n" "$role" "$(median3 "$a" "$b" "$c")" "$a $b $c" >>"$latency"
        done
    done
done
rm -f "$work"/lat*.safetensors

if command -v nvidia-smi >/dev/null && [ "$gpu" != cpu ]; then
    nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv,noheader
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi

# What makes the host wait: one DDIM-50 and one DPM-Solver-10 request under sync
# debugging (a fourth server; warnings go to its log).
if [ "$gpu" != cpu ]; then
    sync_port="$(free_port)"
    start sync "$gpu" "$sync_port" --cuda-sync-debug warn
    port[sync]="$sync_port"
    generate sync "$work/sync.safetensors" 4 3 --sampler ddim --steps 50 >/dev/null
    : >"$work/server-sync.log.mark"
    before="$(wc -l <"$work/server-sync.log")"
    generate sync "$work/sync.safetensors" 4 4 --sampler ddim --steps 50 >/dev/null
    generate sync "$work/sync.safetensors" 4 4 --sampler dpm-solver --steps 10 >/dev/null
    step "sync debugging: warnings during one DDIM-50 + one DPM-Solver-10 request (after a warm-up), by message:"
    tail -n +"$((before + 1))" "$work/server-sync.log" | grep -i "synchroniz" | sed 's/^.*Warning: //' |
        cut -c1-160 | sort | uniq -c | sort -rn | head -12 || true
    step "graph messages of the graphs server:"
    grep -i "graph" "$work/server-graphs.log" | cut -c1-200 | sort | uniq -c | head -12 || true
fi

step "results"
"$py" - "$results" "$latency" "$work/task.json" "$gpu" "$samples" <<'PY'
import glob, json, struct, sys
import torch

results, latency, task_path, gpu, samples = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
task = json.load(open(task_path))
x = torch.tensor(task["data"]["test_x"]); y = torch.tensor(task["data"]["test_y"])

def read(path):  # safetensors without the safetensors package
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n]); body = raw[8 + n:]
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        a, b = meta["data_offsets"]
        out[name] = torch.frombuffer(bytearray(body[a:b]), dtype=torch.float32).reshape(meta["shape"])
    return out

def accuracy(sd):
    h = torch.relu(x @ sd["0.weight"].T + sd["0.bias"])
    return ((h @ sd["2.weight"].T + sd["2.bias"]).argmax(1) == y).float().mean().item()

def flat(sd):
    return torch.cat([sd[k].flatten() for k in sorted(sd)])

rows = [l.rstrip("\n").split("\t") for l in open(results)]
by = {(r, s): (float(ms), out) for r, s, ms, out in rows}
failed = False
print(f"{'sampler':<10}{'server':<16}{'samples':>8}{'sampling ms':>13}{'samples/s':>11}{'vs CPU':>8}{'0-shot acc':>12}")
for sampler in ("ddim", "ddpm"):
    sets = {}
    for role in ("graphs", "eager", "cpu"):
        ms, out = by[(role, sampler)]
        files = sorted(glob.glob(f"{out}/init-*.safetensors"), key=lambda p: int(p.rsplit("-", 1)[1].split(".")[0]))
        sets[role] = [read(f) for f in files]
    cpu_rate = samples / (by[("cpu", sampler)][0] / 1000)
    name = "DDIM-50" if sampler == "ddim" else "DDPM-1000"
    for role, label in (("graphs", f"{gpu} graphs"), ("eager", f"{gpu} eager"), ("cpu", "cpu")):
        ms = by[(role, sampler)][0]
        rate = samples / (ms / 1000)
        acc = sum(map(accuracy, sets[role])) / len(sets[role])
        print(f"{name:<10}{label:<16}{samples:>8}{ms:>13.1f}{rate:>11.1f}{rate / cpu_rate:>7.1f}x{acc:>12.3f}")
    def compare(a, b):
        rel = sorted(((flat(p) - flat(q)).norm() / flat(q).norm()).item() for p, q in zip(sets[a], sets[b]))
        same = all(torch.equal(flat(p), flat(q)) for p, q in zip(sets[a], sets[b]))
        return rel[len(rel) // 2], rel[-1], same
    med, top, same = compare("graphs", "eager")
    print(f"  {sampler}: graphs vs eager: {'bit-identical' if same else 'differ'}; relative L2 median {med:.2e} (max {top:.2e})")
    failed |= med > 1e-5
    med, top, _ = compare("graphs", "cpu")
    acc_g = sum(map(accuracy, sets["graphs"])) / samples
    acc_c = sum(map(accuracy, sets["cpu"])) / samples
    ok = med < 0.05 and abs(acc_g - acc_c) < 0.05
    failed |= not ok
    print(f"  {sampler}: GPU vs CPU: relative L2 median {med:.2e} (max {top:.2e}); zero-shot {acc_g:.3f} vs {acc_c:.3f} -> {'OK' if ok else 'MISMATCH'}")

print()
print(f"{'request':<16}{'samples':>8}{'graphs ms':>11}{'eager ms':>10}{'speed-up':>10}{'graphs samples/s':>18}   (runs: graphs | eager)")
lat = {}
for line in open(latency):
    req, n, role, med, runs = line.rstrip("\n").split("\t")
    lat.setdefault((req, int(n)), {})[role] = (float(med), runs)
for (req, n), r in lat.items():
    g, e = r["graphs"][0], r["eager"][0]
    print(f"{req:<16}{n:>8}{g:>11.1f}{e:>10.1f}{e / g:>9.1f}x{n / (g / 1000):>18.0f}   ({r['graphs'][1]} | {r['eager'][1]})")
sys.exit(1 if failed else 0)
PY
step "done (work dir $work)"
