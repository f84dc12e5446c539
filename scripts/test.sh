#!/usr/bin/env bash
# The whole test suite, on a fresh machine or a warm one: installs what it
# needs (libtorch wheel, client and deployment-check tools), then checks
# formatting and lints, runs every test and checks the deployment files
# offline. CI runs exactly this (.ci/run).
#
# `scripts/test.sh --quick` is the edit loop's tier: the unit and integration
# tests without the slow ones (`#[ignore = "slow …"]`, listed as ignored in
# the output), no fmt, clippy or deployment checks.
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

    step "cargo clippy --all-targets -- -D warnings"
    cargo clippy --locked --all-targets -- -D warnings
fi

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
