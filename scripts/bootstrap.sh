#!/usr/bin/env bash
# Prepares libtorch for building and running weightgen, once per machine.
#
# Source it (`. scripts/bootstrap.sh`) to get the environment exported into
# your shell, or run it (`scripts/bootstrap.sh`) to just install and print the
# `export` lines. It is idempotent: a second run only checks and prints.
#
# - Reuses a user's own libtorch when LIBTORCH is set.
# - Otherwise creates a venv under ${WEIGHTGEN_CACHE:-$HOME/.cache/weightgen}/torch-2.11.0
#   and installs the pinned wheel torch==2.11.0 from PyPI into it.
# - Exports what cargo needs to build tch (LIBTORCH_USE_PYTORCH=1 and the venv's
#   python via VIRTUAL_ENV/PATH) and what the binaries need at run time (WEIGHTGEN_TORCH_LIB, used by
#   build.rs to set an rpath; LD_LIBRARY_PATH as a fallback for tools).
# - Puts the venv first on PATH (torch-sys runs its python to find libtorch).

weightgen_bootstrap() {
    local torch_version="2.11.0"
    local cache="${WEIGHTGEN_CACHE:-$HOME/.cache/weightgen}"
    local venv="$cache/torch-$torch_version"
    local step="[bootstrap]"

    if [ -n "${LIBTORCH:-}" ]; then
        if [ ! -d "$LIBTORCH/lib" ]; then
            echo "$step LIBTORCH=$LIBTORCH has no lib/ directory; unset it to use the pinned wheel" >&2
            return 1
        fi
        echo "$step using your libtorch at LIBTORCH=$LIBTORCH"
        export WEIGHTGEN_TORCH_LIB="$LIBTORCH/lib"
    else
        local py
        py="$(command -v python3 || true)"
        if [ -z "$py" ]; then
            echo "$step python3 not found: install Python 3.10+ with venv and pip (e.g. apt-get install python3 python3-venv python3-pip)" >&2
            return 1
        fi
        if ! "$py" -m pip --version >/dev/null 2>&1; then
            echo "$step pip not found for $py: install it (e.g. apt-get install python3-pip)" >&2
            return 1
        fi
        if [ ! -x "$venv/bin/python" ]; then
            echo "$step creating venv $venv"
            mkdir -p "$cache"
            "$py" -m venv "$venv" || {
                echo "$step could not create a venv with $py: install the venv module (e.g. apt-get install python3-venv)" >&2
                return 1
            }
        else
            echo "$step venv $venv exists"
        fi
        if "$venv/bin/python" -c "import numpy, safetensors, torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$torch_version' else 1)" 2>/dev/null; then
            echo "$step torch==$torch_version already installed"
        else
            echo "$step installing torch==$torch_version, numpy and safetensors into $venv (large download, once)"
            "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "torch==$torch_version" numpy safetensors || {
                echo "$step pip install torch==$torch_version failed" >&2
                return 1
            }
        fi
        local torch_dir
        torch_dir="$("$venv/bin/python" -c 'import torch,os; print(os.path.dirname(torch.__file__))' 2>/dev/null)" || return 1
        export LIBTORCH_USE_PYTORCH=1
        # torch-sys runs `python` from PATH when VIRTUAL_ENV is set.
        export VIRTUAL_ENV="$venv"
        case ":$PATH:" in
            *":$venv/bin:"*) ;;
            *) export PATH="$venv/bin:$PATH" ;;
        esac
        export WEIGHTGEN_TORCH_VENV="$venv"
        export WEIGHTGEN_TORCH_LIB="$torch_dir/lib"
        unset LIBTORCH
    fi
    case ":${LD_LIBRARY_PATH:-}:" in
        *":$WEIGHTGEN_TORCH_LIB:"*) ;;
        *) export LD_LIBRARY_PATH="$WEIGHTGEN_TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ;;
    esac
    echo "$step torch libraries at $WEIGHTGEN_TORCH_LIB"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    set -euo pipefail
    weightgen_bootstrap
    for v in LIBTORCH LIBTORCH_USE_PYTORCH VIRTUAL_ENV PATH WEIGHTGEN_TORCH_VENV WEIGHTGEN_TORCH_LIB LD_LIBRARY_PATH; do
        [ -n "${!v:-}" ] && printf 'export %s=%q\n' "$v" "${!v}"
    done
else
    weightgen_bootstrap
fi
