#!/usr/bin/env bash
# The whole test suite, on a fresh machine or a warm one: installs what it
# needs (libtorch wheel, client and deployment-check tools), then checks
# formatting and lints, runs every test and checks the deployment files
# offline. CI runs exactly this (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
step() { echo "[test] $* ($((SECONDS - started)) s)"; }

step "bootstrap"
. scripts/bootstrap.sh
. scripts/tools.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --locked --all-targets -- -D warnings

step "services: PostgreSQL and S3 (SeaweedFS) on 127.0.0.1"
. scripts/services.sh

step "cargo test"
cargo test --locked

step "deployment files, offline (hadolint, kustomize, schemas, compose, image libraries)"
scripts/check-deploy.sh

step "reflection and health through an independent client (buf curl)"
scripts/check-reflection.sh

step "all passed in $((SECONDS - started)) s"
