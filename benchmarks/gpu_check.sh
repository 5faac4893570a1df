#!/usr/bin/env bash
# The single GPU check: on a machine with an NVIDIA GPU, build pym4 with CUDA, run the GPU
# tests, then the GPU benchmarks of every op, then the resource table (registers, spills,
# shared memory) of every Triton and CUDA kernel compiled for this GPU's arch, the figures the
# CI compile checks give without a GPU. Everything it prints also goes under $OUT
# (default ./gpu_check_out). Uses the machine's own python3 (with torch and triton) and no
# network. Under 10 minutes in all when every step takes its usual time (the limits are caps).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
log() { echo "== $*" | tee -a "$OUT/gpu_check.log"; }
status=0
step() {  # step NAME TIMEOUT CMD...: run one step, log it, remember a failure, go on
  local name=$1 limit=$2; shift 2
  log "$name"
  timeout "$limit" "$@" 2>&1 | tee -a "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { log "$name FAILED (exit $rc)"; status=1; }
}

nvidia-smi -L 2>&1 | tee -a "$OUT/gpu_check.log"
# Installed into a folder of its own (the machine's environment may be read-only), which
# then comes first on the path; PYTHONSAFEPATH keeps the source tree's pym4/ (no compiled
# core) from shadowing it when pytest runs from the repository root.
SITE=${PYM4_GPU_SITE:-/tmp/pym4-gpu-site}
step build 200 env PYM4_CUDA=ON PYM4_CUDA_ARCHS="${PYM4_CUDA_ARCHS:-90}" \
  "$PY" -m pip install --no-build-isolation --no-deps -q --upgrade --target "$SITE" .
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONSAFEPATH=1
step build_info 30 "$PY" -c "import json, pym4; print(json.dumps(pym4.build_info(), indent=1))"
step tests 150 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests
# Benchmarks, one per op (each writes CSV and PNG under $OUT); the step limits keep the
# whole script under 10 minutes.
step bench_sinkhorn 70 "$PY" benchmarks/bench_sinkhorn.py --device cuda --out "$OUT"
step bench_contrastive 70 "$PY" benchmarks/bench_contrastive.py --device cuda --out "$OUT"
step bench_m4 70 "$PY" benchmarks/bench_m4.py --device cuda --sizes 1e5,1e6,1e7 --out "$OUT"
# Resources of every kernel for this GPU's arch, next to the timings above (the same tables
# as make gpu-compile-check and make cuda-check print for sm_90 / sm_80 without a GPU).
step resources_triton 120 "$PY" scripts/gpu_compile_check.py --arch native
step resources_cuda 120 "$PY" scripts/cuda_resources.py --nvcc native --nvcc-path "${CUDACXX:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"
log "done (status $status)"
exit $status
