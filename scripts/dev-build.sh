#!/usr/bin/env bash
# Incremental editable rebuild of pym4._core for the developer loop. Serialised with a lock
# so that two shells rebuilding at once do not race in the same build folder.
# Usage: scripts/dev-build.sh            (CPU-only core, the default for development)
#        PYM4_CUDA=AUTO scripts/dev-build.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export PYM4_CUDA=${PYM4_CUDA:-OFF}
exec flock /tmp/pym4-build.lock "$PY" -m pip install --no-build-isolation --no-deps -q -e .
