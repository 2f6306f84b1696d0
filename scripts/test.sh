#!/usr/bin/env bash
# Set up, then run ruff, mypy --strict and the whole test suite (both
# backends where available).  Extra arguments go to pytest (and skip the linters).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "$#" -eq 0 ]; then  # the whole run (CI): the linters first
    .venv/bin/python -m ruff check pwriter tests bench
    .venv/bin/python -m mypy pwriter
fi
exec .venv/bin/python -m pytest "$@"
