#!/usr/bin/env bash
# Starts weightgen-server as a process and asks it, with buf curl (an
# independent gRPC client), for its services through reflection and for its
# health. Expects a built debug server (cargo build) and scripts/tools.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

server=target/debug/weightgen-server
buf="$WEIGHTGEN_TOOLS_BIN/buf"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
data=$(mktemp -d)
log="$data/server.log"
"$server" --listen "127.0.0.1:$port" --metrics-listen off --device cpu --data-dir "$data/data" 2>"$log" &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -rf "$data"' EXIT

target/debug/weightgen --addr "127.0.0.1:$port" health --wait 30s >/dev/null
methods=$("$buf" curl --protocol grpc --http2-prior-knowledge --list-methods "http://127.0.0.1:$port")
for m in weightgen.v1.GenerationService/GenerateInit weightgen.v1.CatalogService/UploadCheckpoint \
         weightgen.v1.JobService/SubmitJob grpc.health.v1.Health/Check; do
    grep -qx "$m" <<<"$methods" || { echo "reflection: $m missing from:"; echo "$methods"; exit 1; }
done
health=$("$buf" curl --protocol grpc --http2-prior-knowledge -d '{"service":"weightgen.v1.GenerationService"}' \
    "http://127.0.0.1:$port/grpc.health.v1.Health/Check")
grep -q NOT_SERVING <<<"$health" || { echo "unexpected health: $health"; exit 1; }
kill -TERM $pid
wait $pid
echo "buf curl: $(wc -l <<<"$methods") methods listed through reflection; health as expected; clean exit on SIGTERM"
