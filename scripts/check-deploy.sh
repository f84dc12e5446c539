#!/usr/bin/env bash
# Offline checks of the deployment files (Dockerfile, deploy/): no Docker
# engine and no cluster needed. scripts/test.sh runs it after `cargo test`.
#   1. hadolint on the Dockerfile;
#   2. yamllint (strict) on every YAML file under deploy/;
#   3. `kubectl kustomize` of base/, both overlays (as shipped and with every
#      optional component) and both worker Jobs;
#   4. the renderings validated strictly against the Kubernetes schemas of
#      WEIGHTGEN_K8S_VERSIONS (+ the ServiceMonitor CRD, Pod Security);
#   5. the compose files against the compose-spec schema, and every variable
#      they require present in deploy/.env.example;
#   6. the image's shared libraries: every library the binaries load is
#      copied by the Dockerfile's runtime stage or comes from its base image.
# The tools are pinned in scripts/deploy/requirements.txt and installed by
# scripts/tools.sh. The binaries checked in 6 are WEIGHTGEN_BIN_DIR
# (default target/debug, which `cargo test` builds; they link the same
# libraries as the release ones).
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
step() { echo "[deploy] $* ($((SECONDS - started)) s)"; }

# Oldest Kubernetes the manifests support (native gRPC probes, Indexed Jobs
# with backoffLimitPerIndex and podFailurePolicy, preStop sleep) and the
# newest kubernetes-validate 1.37.0 knows.
read -r -a K8S_VERSIONS <<<"${WEIGHTGEN_K8S_VERSIONS:-1.31.0 1.37.0}"
BIN_DIR="${WEIGHTGEN_BIN_DIR:-target/debug}"

[ -n "${WEIGHTGEN_TORCH_LIB:-}" ] || . scripts/bootstrap.sh
[ -n "${WEIGHTGEN_DEPLOY_TOOLS_BIN:-}" ] || . scripts/tools.sh
tools="$WEIGHTGEN_DEPLOY_TOOLS_BIN"
work=$(mktemp -d "${TMPDIR:-/tmp}/weightgen-deploy.XXXXXX")
trap 'rm -rf "$work"' EXIT

step "hadolint Dockerfile"
"$tools/hadolint" --no-color Dockerfile
echo "[deploy] hadolint: no findings"

step "yamllint deploy/"
"$tools/yamllint" --strict -c deploy/.yamllint.yaml deploy/
echo "[deploy] yamllint: no findings"

step "kubectl kustomize"
# A copy, with the example secrets standing in for the git-ignored
# secrets.env and auth-tokens (a real one is never read here).
cp -r deploy/k8s "$work/k8s"
cp deploy/k8s/common/secrets.env.example "$work/k8s/common/secrets.env"
cp deploy/k8s/common/auth-tokens.example "$work/k8s/common/auth-tokens"
mkdir -p "$work/rendered"
render() { # NAME DIR
    "$tools/kubectl" kustomize "$work/k8s/$2" >"$work/rendered/$1.yaml"
    echo "[deploy] rendered $2: $(grep -c '^kind:' "$work/rendered/$1.yaml") resources"
}
render base base
for overlay in cpu gpu; do
    render "$overlay" "overlays/$overlay"
done
for overlay in cpu gpu; do
    # The optional components are enabled by uncommenting them in the
    # overlay; do that to a copy of the overlay.
    cp -r "$work/k8s/overlays/$overlay" "$work/k8s/overlays/$overlay-all"
    printf 'components:\n  - ../../components/servicemonitor\n  - ../../components/queue-worker\n  - ../../components/tls\n  - ../../components/grafana-dashboard\n' \
        >>"$work/k8s/overlays/$overlay-all/kustomization.yaml"
    render "$overlay-all" "overlays/$overlay-all"
done
render zoo-build jobs/zoo-build
render train jobs/train

step "validate the renderings (Kubernetes ${K8S_VERSIONS[*]}, strict)"
versions=()
for v in "${K8S_VERSIONS[@]}"; do versions+=(--k8s-version "$v"); done
"$tools/python" scripts/deploy/validate_manifests.py "${versions[@]}" "$work"/rendered/*.yaml

step "compose files"
"$tools/check-jsonschema" --builtin-schema vendor.compose-spec deploy/compose.yaml deploy/compose.gpu.yaml
# Variables the compose files require (${VAR:?…}) must be in the example .env.
missing=0
# shellcheck disable=SC2016 # the pattern matches a literal "${"
required=$(grep -ho '\${[A-Z0-9_]*:?' deploy/compose*.yaml | sed 's/^\${//; s/:?$//' | sort -u)
while read -r var; do
    if ! grep -q "^$var=" deploy/.env.example; then
        echo "[deploy] FAIL: deploy/compose.yaml requires $var, which deploy/.env.example lacks" >&2
        missing=1
    fi
done <<<"$required"
[ "$missing" = 0 ] || exit 1
echo "[deploy] compose: every required variable is in deploy/.env.example"

step "shared libraries of the image (binaries in $BIN_DIR)"
if [ -z "${WEIGHTGEN_TORCH_VENV:-}" ]; then
    # The image is built from the pinned wheel; a LIBTORCH of your own has
    # another layout (and maybe other libraries) to compare against.
    echo "[deploy] SKIPPED: the image check needs scripts/bootstrap.sh's torch wheel (LIBTORCH is set)" >&2
    step "deployment checks passed, except the image's shared libraries"
    exit 0
fi
for binary in weightgen-server weightgen-worker weightgen; do
    [ -x "$BIN_DIR/$binary" ] || {
        echo "[deploy] FAIL: $BIN_DIR/$binary is missing: run cargo build --bins first (or set WEIGHTGEN_BIN_DIR)" >&2
        exit 1
    }
done
"$tools/python" scripts/deploy/check_shared_libs.py --dockerfile Dockerfile --bin-dir "$BIN_DIR" \
    --site-packages "$(dirname "$(dirname "$WEIGHTGEN_TORCH_LIB")")"

step "deployment checks passed"
