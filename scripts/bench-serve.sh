#!/usr/bin/env bash
# GenerateInit under load over loopback gRPC: latency p50/p99 and
# throughput at 1, 8 and 64 concurrent clients for DDIM-50 and DDPM-1000,
# the batching gain, and resident memory over many requests. Prints a
# Markdown table (docs/BENCHMARKS.md). WEIGHTGEN_BENCH_REQUESTS sets the
# memory run's request count (default 10,000).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bootstrap.sh
cargo bench --locked --bench serve
