#!/usr/bin/env bash
# Validate a GPU machine in about ten minutes; writes OUT_DIR/summary.json and OUT_DIR/summary.md.
#
#   bash benchmarks/gpu_check.sh OUT_DIR              # on the GPU machine
#   bash benchmarks/gpu_check.sh OUT_DIR --cpu-smoke  # toy sizes on the CPU (what CI runs)
#
# The stages are in benchmarks/gpu_check.py. PYTHON selects the interpreter (default: the
# repository's .venv if there is one, else python3).
set -euo pipefail
if [[ $# -lt 1 || "$1" == -* ]]; then
    echo "usage: bash benchmarks/gpu_check.sh OUT_DIR [--cpu-smoke]" >&2
    exit 2
fi
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$root/.venv/bin/python" ]]; then PYTHON="$root/.venv/bin/python"; else PYTHON=python3; fi
fi
exec "$PYTHON" "$here/gpu_check.py" check "$@"
