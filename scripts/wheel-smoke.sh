#!/usr/bin/env bash
# Smoke test of a built pym4 wheel, as a user elsewhere would install it (`make wheel` runs it):
#   1. the compiled core needs no torch, no libcuda and no libcudart (cudart is linked
#      statically, the driver is loaded at run time), so one wheel serves every torch version
#      and machines without a GPU: checked on the .so's DT_NEEDED entries (readelf -d);
#   2. every library it needs outside the manylinux policy (libgomp) is vendored: ldd of the
#      installed core resolves everything;
#   3. in a fresh venv (torch==2.13.0 first, then the wheel): import, build_info() lists the
#      CUDA archs ($PYM4_WHEEL_ARCHS, default "80,90"), and Sinkhorn, a loss and M4 run on the
#      CPU and agree with the tests' references (scripts/wheel_smoke.py).
# Usage: scripts/wheel-smoke.sh dist/pym4-*.whl
set -euo pipefail
[ $# -eq 1 ] && [ -f "$1" ] || { echo "usage: $0 WHEEL (one .whl file)" >&2; exit 2; }
WHEEL=$(readlink -f "$1")
REPO=$(cd "$(dirname "$0")/.." && pwd)
ARCHS=${PYM4_WHEEL_ARCHS:-80,90}
PYTHON=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/pym4-wheel-smoke.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

echo "== wheel: $(basename "$WHEEL") ($(du -h "$WHEEL" | cut -f1))"
unzip -q "$WHEEL" -d "$WORK/unpacked"
CORE=$(ls "$WORK"/unpacked/pym4/_core*.so)
NEEDED=$(readelf -d "$CORE" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p')
echo "core needs: $(echo $NEEDED)"
if echo "$NEEDED" | grep -E -q '^lib(torch|c10|cuda|cudart|nvrtc)'; then
  echo "FAIL: the core must not link torch, libcuda or libcudart" >&2
  exit 1
fi
echo "vendored: $(ls "$WORK"/unpacked/pym4.libs 2>/dev/null | tr '\n' ' ')"

echo "== fresh venv: torch==2.13.0, then the wheel"
"$PYTHON" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
"$VPY" -m pip install -q --upgrade pip
"$VPY" -m pip install -q torch==2.13.0
"$VPY" -m pip install -q "$WHEEL"
# Run from an empty folder: a source tree's pym4/ (no compiled core) must not shadow the install.
cd "$WORK"
INSTALLED=$("$VPY" -c "import importlib.util; print(importlib.util.find_spec('pym4._core').origin)")
if ldd "$INSTALLED" | grep -q "not found"; then
  ldd "$INSTALLED" >&2
  echo "FAIL: the installed core has unresolved libraries" >&2
  exit 1
fi

# The references of the tests (tests/references.py: plain torch/numpy, no pym4) check the results.
PYM4_WHEEL_ARCHS="$ARCHS" PYM4_REFERENCES="$REPO/tests" "$VPY" "$REPO/scripts/wheel_smoke.py"
