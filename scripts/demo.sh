#!/usr/bin/env bash
# Set up, generate an example corpus of 200 mixed traces (gzip and plain,
# array style and NDJSON) in example/traces, and merge it into
# example/merged.pfw.  Extra arguments go to `pwriter merge`
# (e.g. --layout sharded, --json).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ ! -d example/traces ]; then
    .venv/bin/pwriter gen-corpus example/traces --files 200 --events 500
fi
.venv/bin/pwriter merge -d example/traces -o example/merged.pfw --force "$@"
