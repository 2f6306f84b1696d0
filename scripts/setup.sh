#!/usr/bin/env bash
# Idempotent set-up for a fresh machine: liburing-dev when it can be had
# (root and apt-get; without it pwriter still installs and uses its
# thread-pool backend), then a virtual environment in .venv holding pwriter
# (editable) and its test tools.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -e /usr/include/liburing.h ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "setup: installing liburing-dev" >&2
        if ! (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq liburing-dev) >/dev/null 2>&1; then
            echo "setup: liburing-dev could not be installed; pwriter will use its thread-pool backend" >&2
        fi
    else
        echo "setup: liburing-dev is missing and cannot be installed here (needs root and apt-get); pwriter will use its thread-pool backend" >&2
    fi
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.pwriter-installed
wanted=$(cat pyproject.toml setup.py pwriter/_*_build.py | sha256sum | cut -d" " -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
    echo "setup: installing pwriter and its test tools into .venv" >&2
    if ! .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,mpi]'; then
        echo "setup: the MPI extra (mpi4py, mpich) could not be installed; merges run in one process and the MPI tests are skipped" >&2
        .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
    fi
    echo "$wanted" > "$stamp"
fi
# Byte-compile pwriter once: an editable install writes no bytecode where
# PYTHONDONTWRITEBYTECODE is set (as on the development VM), and every start
# would then compile pwriter's modules again (0.03 s of a 0.22 s start-up).
.venv/bin/python -m compileall -q pwriter >/dev/null 2>&1 || true
