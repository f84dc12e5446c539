#!/usr/bin/env bash
# The whole test suite, on a fresh machine or a warm one: installs what it
# needs (libtorch wheel, client and deployment-check tools), then checks
# formatting and lints, runs every test and checks the deployment files
# offline. CI runs exactly this (.ci/run).
#
# `scripts/test.sh --quick` is the edit loop's tier: the unit and integration
# tests without the slow ones (`#[ignore = "slow …"]`, listed as ignored in
# the output), no fmt or deployment checks.
#
# Lints ride on the test build: clippy-driver stands in for rustc on this
# package's own crates (cargo's RUSTC_WORKSPACE_WRAPPER, which is how `cargo
# clippy` runs it; CLIPPY_ARGS is the channel cargo clippy passes `-D
# warnings` through), so one build both lints and compiles every target,
# and the dependencies are compiled once instead of once more in check mode
# (about 5 minutes from a clean clone on 2 cores). It reports exactly what
# `cargo clippy --all-targets -- -D warnings` reports. Both tiers build with
# it, so they share one set of artifacts.
set -euo pipefail
quick=false
case "${1:-}" in
    --quick) quick=true ;;
    "") ;;
    *) echo "usage: scripts/test.sh [--quick]" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
started=$SECONDS
step() { echo "[test] $* ($((SECONDS - started)) s)"; }

step "bootstrap"
. scripts/bootstrap.sh
. scripts/tools.sh

if ! $quick; then
    step "cargo fmt --check"
    cargo fmt --all -- --check
fi

command -v clippy-driver >/dev/null || { echo "clippy-driver not found: rustup component add clippy" >&2; exit 1; }
export RUSTC_WORKSPACE_WRAPPER=clippy-driver
export CLIPPY_ARGS=-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__
step "cargo test --no-run --all-targets, linted (clippy -D warnings)"
cargo test --locked --all-targets --no-run

# Tests run two at a time on two cores, and the networks they train and
# sample are tiny: one libtorch intra-op thread per process (in-process
# tests set it too), or each op of a worker or server the tests start
# wakes OpenMP threads that fight the other test for the cores (a 300-step
# training took 19 s instead of 7 s, a third of it in the kernel).
export OMP_NUM_THREADS=1

step "services: PostgreSQL and S3 (SeaweedFS) on 127.0.0.1"
. scripts/services.sh

if $quick; then
    step "cargo test (quick tier: the slow tests are listed as ignored)"
    cargo test --locked
    step "quick tier passed in $((SECONDS - started)) s"
    exit 0
fi

step "cargo test, the slow tests included"
cargo test --locked -- --include-ignored

step "deployment files, offline (hadolint, kustomize, schemas, compose, image libraries)"
scripts/check-deploy.sh

step "reflection and health through an independent client (buf curl)"
scripts/check-reflection.sh

step "all passed in $((SECONDS - started)) s"
