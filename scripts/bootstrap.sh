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
# - Installs nvidia-cuda-crt (CUDA headers the CUDA-graph shim compiles against).
# - Installs wordfreq==3.1.1 and exports its word lists once to the cache
#   (WEIGHTGEN_WORDS_DIR), the data of the `words` family.

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
        # The CUDA runtime headers of the wheel include crt/host_config.h,
        # which ships in nvidia-cuda-crt: build.rs needs it to compile the
        # CUDA-graph shim (without it the server runs every pass eagerly).
        local cuda_include="$torch_dir/../nvidia/cu13/include"
        if [ -f "$cuda_include/cuda_runtime_api.h" ] && [ ! -f "$cuda_include/crt/host_config.h" ]; then
            echo "$step installing nvidia-cuda-crt==13.0.88 (CUDA headers for the CUDA-graph shim)"
            "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps "nvidia-cuda-crt==13.0.88" ||
                echo "$step pip install nvidia-cuda-crt failed: the build will not record CUDA graphs" >&2
        fi
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
    if ! weightgen_words; then
        # With a user's own libtorch, Python is optional: only the words
        # family needs it.
        [ -n "${WEIGHTGEN_TORCH_VENV:-}" ] && return 1
        echo "$step no word lists (the words family needs Python 3 with venv and pip once)" >&2
    fi
}

# The `words` family's data: PyPI wordfreq==3.1.1 (word lists of 42 languages
# inside the wheel) in the torch venv (or a small venv of its own when
# LIBTORCH points at a user's libtorch), exported once to plain files under
# the cache (scripts/export-words.py). Exports WEIGHTGEN_WORDS_DIR.
weightgen_words() {
    local version="3.1.1"
    local cache="${WEIGHTGEN_CACHE:-$HOME/.cache/weightgen}"
    local out="$cache/words/wordfreq-$version"
    local step="[bootstrap]"
    local here
    here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
    if [ ! -f "$out/MANIFEST" ]; then
        local venv="${WEIGHTGEN_TORCH_VENV:-$cache/wordfreq-$version}"
        if [ ! -x "$venv/bin/python" ]; then
            command -v python3 >/dev/null 2>&1 && python3 -m venv "$venv" || {
                echo "$step could not create a venv for wordfreq at $venv" >&2
                return 1
            }
        fi
        if ! "$venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(0 if m.version('wordfreq') == '$version' else 1)" 2>/dev/null; then
            echo "$step installing wordfreq==$version into $venv (the words family's word lists)"
            "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "wordfreq==$version" || {
                echo "$step pip install wordfreq==$version failed" >&2
                return 1
            }
        fi
        "$venv/bin/python" "$here/export-words.py" "$out" || {
            echo "$step exporting the word lists to $out failed" >&2
            return 1
        }
    else
        echo "$step word lists at $out"
    fi
    export WEIGHTGEN_WORDS_DIR="$out"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    set -euo pipefail
    weightgen_bootstrap
    for v in LIBTORCH LIBTORCH_USE_PYTORCH VIRTUAL_ENV PATH WEIGHTGEN_TORCH_VENV WEIGHTGEN_TORCH_LIB LD_LIBRARY_PATH WEIGHTGEN_WORDS_DIR; do
        [ -n "${!v:-}" ] && printf 'export %s=%q\n' "$v" "${!v}"
    done
else
    weightgen_bootstrap
fi
