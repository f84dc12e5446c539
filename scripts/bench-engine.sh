#!/usr/bin/env bash
# Engine benchmark: weightgen's sampler and training step against the same
# computation in PyTorch eager, same machine, same run. Prints a Markdown
# table (docs/BENCHMARKS.md). WEIGHTGEN_BENCH_QUICK=1 runs the small D only;
# WEIGHTGEN_BENCH_ONLY=TEXT only the measurements whose name contains TEXT.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bootstrap.sh
cargo bench --locked --bench engine
