#!/usr/bin/env bash
# The CUDA path, on a machine with an NVIDIA GPU and PyTorch 2.11 installed:
# trains a small digits denoiser on the GPU (fp16 autocast), starts one
# weightgen-server on cuda:0 and one on the CPU over the same data,
# generates the same requests on both, checks that the GPU's samples match
# the CPU's statistically (same seeds draw the same noise on every device,
# so samples should agree up to float rounding, and score the same zero-shot),
# and prints samples/s on GPU vs CPU for DDIM-50 and DDPM-1000.
#
# Binaries: $WEIGHTGEN_BIN (default target/release; built with cargo when
# missing and cargo exists — a GPU machine without Rust gets them copied in).
# libtorch: the python3 on PATH's torch (its lib/ goes on LD_LIBRARY_PATH).
# WEIGHTGEN_GPU_DEVICE=cpu runs the same script on the CPU twice (a dry run
# of the plumbing on a machine without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
step() { echo "[gpu-check] $*"; }

gpu="${WEIGHTGEN_GPU_DEVICE:-cuda:0}"
bin="${WEIGHTGEN_BIN:-target/release}"
work="${WEIGHTGEN_GPU_CHECK_DIR:-$(mktemp -d)}"
samples="${WEIGHTGEN_GPU_CHECK_SAMPLES:-64}"
py="${PYTHON:-python3}"

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

data="$work/data"
step "zoo: 300 digits models on $gpu (data $data)"
"$bin/weightgen-worker" zoo build --family digits --zoo digits-gpu --models 300 --shared-init --steps 100 \
    --device "$gpu" --data-dir "$data" 2>"$work/zoo.log"
step "denoiser: 2000 steps on $gpu, mixed precision where CUDA"
"$bin/weightgen-worker" train --zoo digits-gpu --denoiser-id digits-gpu-check --steps 2000 --learning-rate 1e-3 \
    --widths 256,128 --ema-decay 0.995 --eval-tasks 10 --eval-guidance 3 --precision auto --device "$gpu" \
    --activate --data-dir "$data" 2>"$work/train.log" | tail -1

free_port() { "$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
start() { # device port max-samples
    "$bin/weightgen-server" --listen "127.0.0.1:$2" --metrics-listen "127.0.0.1:0" --data-dir "$data" \
        --device "$1" --max-samples "$3" 2>"$work/server-${1/:/}.log" &
    pids+=($!)
    "$bin/weightgen" --addr "127.0.0.1:$2" health --service weightgen.v1.GenerationService --wait 120s >/dev/null
}
gpu_port="$(free_port)"; cpu_port="$(free_port)"
start "$gpu" "$gpu_port" 1024
start cpu "$cpu_port" "$samples"
"$bin/weightgen" --addr "127.0.0.1:$gpu_port" server-info
"$bin/weightgen" task --family digits --held-out-seed 7 -o "$work/task.json"

results="$work/results.tsv"
: >"$results"
for sampler in ddim ddpm; do
    # DDIM-50 as the table says (the server's default DDIM is 10 steps); DDPM runs all T.
    steps=()
    [ "$sampler" = ddim ] && steps=(--steps 50)
    for role in gpu cpu; do
        port=$([ "$role" = gpu ] && echo "$gpu_port" || echo "$cpu_port")
        out="$work/$sampler-$role"
        mkdir -p "$out"
        # A warm-up call, then the measured one (same seed on both devices).
        "$bin/weightgen" --addr "127.0.0.1:$port" --timeout 600s generate --task "$work/task.json" \
            --samples 8 --sampler "$sampler" "${steps[@]}" --guidance 3 --seed 99 -o "$out/warmup.safetensors" >/dev/null
        line="$("$bin/weightgen" --addr "127.0.0.1:$port" --timeout 600s generate --task "$work/task.json" \
            --samples "$samples" --sampler "$sampler" "${steps[@]}" --guidance 3 --seed 1 -o "$out/init.safetensors" | tail -1)"
        ms="$(sed -n 's/.*sampling \([0-9.]*\) ms.*/\1/p' <<<"$line")"
        printf '%s\t%s\t%s\t%s\n' "$role" "$sampler" "$ms" "$out" >>"$results"
    done
done

# GPU memory of the GPU server (nvidia-smi: CUDA context + torch's caching
# allocator, which keeps its peak): after loading, then after one request of
# each batch size (DDIM-50, guidance 3).
if command -v nvidia-smi >/dev/null && [ "$gpu" != cpu ]; then
    gpu_mem() { nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits |
        awk -F', ' -v pid="${pids[0]}" '$1 == pid { print $2 }'; }
    step "GPU memory of the cuda server after the runs above: $(gpu_mem) MiB"
    for n in 1 64 256 1024; do
        line="$("$bin/weightgen" --addr "127.0.0.1:$gpu_port" --timeout 600s generate --task "$work/task.json" \
            --samples "$n" --sampler ddim --steps 50 --guidance 3 --seed 5 -o "$work/mem-$n.safetensors" 2>&1 | tail -1)" ||
            line="failed: $line"
        step "GPU memory after a $n-sample DDIM-50 request: $(gpu_mem) MiB ($line)"
    done
    nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv,noheader
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi

step "GPU ($gpu) vs CPU: same requests, same seeds"
"$py" - "$results" "$work/task.json" "$gpu" "$samples" <<'PY'
import glob, json, struct, sys
import torch

results, task_path, gpu, samples = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
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

rows = [l.rstrip("\n").split("\t") for l in open(results)]
by = {(d, s): (float(ms), out) for d, s, ms, out in rows}
failed = False
print(f"{'sampler':<10}{'device':<10}{'samples':>8}{'sampling ms':>13}{'samples/s':>11}{'speed-up':>10}{'0-shot acc':>12}")
for sampler in ("ddim", "ddpm"):
    sets = {}
    for role in ("gpu", "cpu"):
        ms, out = by[(role, sampler)]
        files = sorted(glob.glob(f"{out}/init-*.safetensors"), key=lambda p: int(p.rsplit("-", 1)[1].split(".")[0]))
        sets[role] = [read(f) for f in files]
    cpu_rate = samples / (by[("cpu", sampler)][0] / 1000)
    for role, device in (("gpu", gpu), ("cpu", "cpu")):
        ms = by[(role, sampler)][0]
        rate = samples / (ms / 1000)
        acc = sum(map(accuracy, sets[role])) / len(sets[role])
        name = "DDIM-50" if sampler == "ddim" else "DDPM-1000"
        print(f"{name:<10}{device:<10}{samples:>8}{ms:>13.0f}{rate:>11.1f}{rate / cpu_rate:>9.1f}x{acc:>12.3f}")
    # Same seeds, same noise: per-sample relative L2 distance, and the
    # zero-shot accuracy of the two sets.
    rel = []
    for a, b in zip(sets["gpu"], sets["cpu"]):
        va = torch.cat([a[k].flatten() for k in sorted(a)]); vb = torch.cat([b[k].flatten() for k in sorted(b)])
        rel.append(((va - vb).norm() / vb.norm()).item())
    rel.sort()
    acc_gpu = sum(map(accuracy, sets["gpu"])) / samples
    acc_cpu = sum(map(accuracy, sets["cpu"])) / samples
    mean_gap = max(abs(torch.stack([s[k] for s in sets["gpu"]]).mean(0) - torch.stack([s[k] for s in sets["cpu"]]).mean(0)).max().item() for k in sets["gpu"][0])
    ok = rel[len(rel) // 2] < 0.05 and abs(acc_gpu - acc_cpu) < 0.05
    failed |= not ok
    print(f"  {sampler}: per-sample relative L2 GPU vs CPU median {rel[len(rel)//2]:.2e} (max {rel[-1]:.2e}); "
          f"largest gap of per-weight means {mean_gap:.2e}; zero-shot {acc_gpu:.3f} vs {acc_cpu:.3f} -> {'OK' if ok else 'MISMATCH'}")
sys.exit(1 if failed else 0)
PY
step "done (work dir $work)"
