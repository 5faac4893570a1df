#!/usr/bin/env bash
# The single GPU check: on a machine with an NVIDIA GPU, build pym4 with CUDA, run the GPU
# tests, the resource table (registers, spills, shared memory) of every Triton and CUDA kernel
# compiled for this GPU's arch (the figures the CI compile checks give without a GPU), the GPU
# benchmark of every op, and the small GPU tests again under compute-sanitizer (memcheck,
# racecheck). Everything it prints also goes under $OUT
# (default ./gpu_check_out). Uses the machine's own python3 (with torch and triton) and no
# network. At most PYM4_GPU_BUDGET_S (570 s) in all: the step limits are caps, cut to the time left.
#
# --bundle: $OUT then gets a handful of files, whatever the steps write (a lent GPU machine
# brings back at most 8 files from $OUT, and the steps write about 20): gpu_check.log (the
# step summary) and gpu_check_steps.log (every step's output, in order), both written as the
# run goes (a run killed mid-way still leaves them), and at exit (after a failed step or a
# SIGTERM too) the plots and gpu_check.tar.gz with every file.
# On a lent machine (the session's one call; the wheelhouse carried, see --fill-wheelhouse):
#   bash benchmarks/gpu_check.sh --bundle        (run's carry: ["wheelhouse"], timeout_s 600)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
# Where the summary and every step's output also go as they are written (--bundle: into the
# destination folder itself; else nowhere more, the per-step logs in $OUT holding them).
LIVE_SUMMARY=/dev/null LIVE_STEPS=/dev/null
bundle() {  # the files of the run in $OUT (a folder of its own) into $BUNDLE_TO, then removed
  cp "$OUT"/*.png "$BUNDLE_TO/" 2>/dev/null
  tar -czf "$BUNDLE_TO/gpu_check.tar.gz" -C "$OUT" . && rm -rf "$OUT"
}
if [ "${1:-}" = "--bundle" ]; then
  shift
  BUNDLE_TO=$OUT
  OUT=$(mktemp -d /tmp/gpu_check.XXXXXX)
  LIVE_SUMMARY=$BUNDLE_TO/gpu_check.log LIVE_STEPS=$BUNDLE_TO/gpu_check_steps.log
  : > "$LIVE_SUMMARY"
  : > "$LIVE_STEPS"
  trap bundle EXIT
  trap 'exit 143' TERM
  trap 'exit 130' INT
fi
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
log() { echo "== $*" | tee -a "$OUT/gpu_check.log" "$LIVE_SUMMARY"; }
status=0
# The whole script's time (a GPU session's one call is at most 600 s): each step's limit is
# cut to what is left, and a step with under 15 s left is skipped (logged as a failure), so
# the logs of the steps that ran always come back.
BUDGET=${PYM4_GPU_BUDGET_S:-570}
step() {  # step NAME TIMEOUT CMD...: run one step, log it, remember a failure, go on
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - SECONDS))
  if [ "$left" -lt 15 ]; then log "$name SKIPPED (${left}s of the ${BUDGET}s budget left)"; status=1; return; fi
  [ "$limit" -le "$left" ] || limit=$left
  log "$name (limit ${limit}s)"
  echo "=== $name" >> "$LIVE_STEPS"
  # (-k: a step that ignores the TERM is killed 10 s later, within the budget's margin)
  if [ "$(type -t "$1")" = "function" ]; then "$@"; else timeout -k 10 "$limit" "$@"; fi 2>&1 \
    | tee -a "$OUT/$name.log" "$LIVE_STEPS"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { log "$name FAILED (exit $rc)"; status=1; }
}

# Anchors the GPU benchmarks compare against (POT, open_clip, Inf-CL), as pip name=import
# name. The GPU machine may have no network: they come from a local wheelhouse folder
# (git-ignored), filled beforehand on a machine with one by
#   benchmarks/gpu_check.sh --fill-wheelhouse    (PYM4_WHEELHOUSE_PY picks the Python: 3.12, the
# lent GPU machines' python3, by default; POT's wheels are per Python version)
WHEELHOUSE=${PYM4_WHEELHOUSE:-wheelhouse}
ANCHORS="POT=ot open_clip_torch=open_clip inf_cl=inf_cl"
if [ "${1:-}" = "--fill-wheelhouse" ]; then
  mkdir -p "$WHEELHOUSE"
  for anchor in $ANCHORS; do
    # Binary wheels for the GPU machine's platform; no dependencies (it has numpy, torch, ...).
    # manylinux2014 alone on purpose: POT's newest wheel (0.9.7, manylinux_2_28) is 33 MB,
    # half of what a GPU call may carry; 0.9.5's is 0.9 MB.
    "$PY" -m pip download --no-deps --only-binary=:all: --platform manylinux2014_x86_64 \
      --python-version "${PYM4_WHEELHOUSE_PY:-3.12}" -d "$WHEELHOUSE" "${anchor%%=*}" \
      || echo "== ${anchor%%=*}: no wheel downloaded (its benchmark column will be skipped)"
  done
  ls -l "$WHEELHOUSE"
  exit 0
fi
# DRY_RUN=1: every step up to the first one that needs a GPU, then stop (for a machine
# without one: shows the build, the install of the anchors and the imports work).
DRY_RUN=${DRY_RUN:-0}

nvidia-smi -L 2>&1 | tee -a "$OUT/gpu_check.log" "$LIVE_SUMMARY"
# The core links the CUDA runtime of the nvcc that builds it statically: a driver older than
# that toolkit fails the first CUDA call ("driver version is insufficient"). Both versions
# go in the log, next to torch's own CUDA, so that such a failure reads at once.
{ echo "driver: $(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>&1 | head -1)," \
       "$(nvidia-smi 2>/dev/null | grep -o 'CUDA Version: [0-9.]*' | head -1)"
  echo "nvcc: $("${CUDACXX:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}" --version 2>&1 | grep -o 'release [0-9.]*' | head -1)"
  echo "torch: $("$PY" -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda)' 2>&1 | tail -1)"
} 2>&1 | tee -a "$OUT/gpu_check.log" "$LIVE_SUMMARY"
# Installed into a folder of its own (the machine's environment may be read-only), which
# then comes first on the path; PYTHONSAFEPATH keeps the source tree's pym4/ (no compiled
# core) from shadowing it when pytest runs from the repository root.
SITE=${PYM4_GPU_SITE:-/tmp/pym4-gpu-site}
# CMake's CUDA detection looks at CUDACXX, PATH and CUDA_PATH only: name nvcc where the
# image keeps it off PATH (the usual /usr/local/cuda/bin).
export CUDACXX=${CUDACXX:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
step build "${PYM4_BUILD_LIMIT:-200}" env PYM4_CUDA=ON PYM4_CUDA_ARCHS="${PYM4_CUDA_ARCHS:-90}" \
  "$PY" -m pip install --no-build-isolation --no-deps -q --upgrade --target "$SITE" .
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONSAFEPATH=1
# The build just made must be the pym4 every later step imports, with its CUDA kernels: an
# editable install in $PY's environment (`make setup`'s .venv) is found by its own import
# hook before PYTHONPATH, and would run the tests against a CPU-only core in silence.
check_build() {
  "$PY" - "$SITE" <<'PYEOF'
import json, os, sys
import pym4
print(json.dumps(pym4.build_info(), indent=1))
site, where = os.path.realpath(sys.argv[1]), os.path.realpath(pym4.__file__)
if not where.startswith(site + os.sep):
    sys.exit(f"pym4 is imported from {where}, not from the build in {site}: another install shadows it "
             f"(an editable one, e.g. make setup's .venv); run with a python that has no pym4 (PYTHON=...)")
if not pym4.build_info()["cuda"]:
    sys.exit(f"the build in {site} has no CUDA kernels (build_info cuda=False): see the build step's log")
PYEOF
}
step build_info 40 check_build
if [ "$status" -ne 0 ]; then log "stopping: the later steps would not test this build"; log "done (status $status)"; exit $status; fi
install_anchors() {  # each missing anchor from the wheelhouse, into the same folder
  local anchor missing=""
  # Found, not imported: open_clip's package import needs torchvision, but the tests and the
  # benchmark load its loss.py by path (installed --no-deps, as the Makefile does).
  found() { "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)"; }
  for anchor in $ANCHORS; do
    found "${anchor#*=}" || missing="$missing ${anchor%%=*}"
  done
  [ -n "$missing" ] || { echo "anchors already installed"; return 0; }
  if [ ! -d "$WHEELHOUSE" ]; then
    echo "missing anchors:$missing; no wheelhouse at $WHEELHOUSE (see --fill-wheelhouse): their columns are skipped"
    return 0
  fi
  for name in $missing; do
    "$PY" -m pip install --no-index --find-links "$WHEELHOUSE" --no-deps -q --target "$SITE" "$name" \
      || echo "$name: not in the wheelhouse, its column is skipped"
  done
  for anchor in $ANCHORS; do
    if found "${anchor#*=}"; then echo "${anchor#*=}: installed"; else echo "${anchor#*=}: missing"; fi
  done
}
step anchors 40 install_anchors
step triton_import 40 "$PY" -c "from pym4.kernels import sinkhorn as k; print(len(list(k.compile_configs())), 'Triton Sinkhorn configurations')"
if [ "$DRY_RUN" = "1" ]; then
  log "dry run: stopping before the first CUDA call (the GPU tests, benchmarks --device cuda)"
  log "done (status $status)"
  exit $status
fi
# Includes the Sinkhorn GPU tests: CUDA kernel with group= (NCCL group of one) and prototypes=,
# the torch fallback's launch counts, and the native Triton Sinkhorn (test_sinkhorn_triton.py).
# (The limit allows for a cold Triton cache: each shape's specialisation of each kernel is
# compiled on first use, ~130 of them in the Sinkhorn tests alone.)
step tests 240 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests
# The Triton test files whole: with a GPU present their unmarked tests (both forms, out=,
# non-contiguous input, the features form, non-finite input) run natively on CUDA too, and
# -m gpu above selects only their marked ones.
step tests_triton 120 "$PY" -m pytest -q -m "not gpu" -p no:cacheprovider tests/test_sinkhorn_triton.py \
  tests/test_contrastive_triton.py
# The GPU tests marked `memcheck` (small cases reaching every CUDA kernel, each launch path,
# the group= passes, and the Triton kernels) again under compute-sanitizer: none of this code
# had run before a GPU was lent, and an out-of-bounds access that lands in memory the process
# owns, or a shared-memory race, passes a test and corrupts the next. torch's caching
# allocator is off so each tensor is its own allocation (else an overrun into a neighbouring
# tensor of the same segment goes unseen); API error codes (torch's probes) are not reported.
# Only pym4's kernels are checked (compute-sanitizer's filters add up: the CUDA ones, in the
# namespace pym4::cuda, and the Triton ones by name): torch's, cuBLAS's and NCCL's run
# uninstrumented, which keeps the steps inside their limits.
TRITON_KERNELS='^_(column|row|combine|clip_lse|clip_grad|siglip_fwd|siglip_grad)_kernel$'
sanitize() {  # sanitize TOOL FILTER... -- PYTEST-ARGS...; $limit is the calling step's (bash's dynamic scope)
  local tool=$1 cs=${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || command -v "$(dirname "$CUDACXX")/compute-sanitizer" \
    || echo /usr/local/cuda/bin/compute-sanitizer)}
  local filters=()
  shift
  while [ "$1" != "--" ]; do filters+=(--kernel-name "$1"); shift; done
  shift
  if [ ! -x "$cs" ]; then log "$tool SKIPPED: compute-sanitizer not found ($cs)"; return 0; fi
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout --kill-after=10 "$limit" "$cs" --tool "$tool" --error-exitcode 86 \
    --report-api-errors no --print-limit 20 "${filters[@]}" \
    "$PY" -m pytest -q -m memcheck -p no:cacheprovider --durations=15 "$@"
}
# Resources of every kernel for this GPU's arch (the same tables as make gpu-compile-check
# and make cuda-check print for sm_90 / sm_80 without a GPU): seconds, so before the long steps.
step resources_triton 120 "$PY" scripts/gpu_compile_check.py --arch native
step resources_cuda 120 "$PY" scripts/cuda_resources.py --nvcc native --nvcc-path "$CUDACXX"
# Benchmarks, one per op (each writes CSV and PNG under $OUT), Sinkhorn's (issue 10's launch
# counts and times) before the sanitizers; the budget above keeps the whole script under 10 minutes.
step bench_sinkhorn 70 "$PY" benchmarks/bench_sinkhorn.py --device cuda --out "$OUT"
step memcheck 120 sanitize memcheck kns=pym4 "regex=$TRITON_KERNELS" -- tests
# Shared-memory races in pym4's own CUDA kernels (the Triton ones are Triton's code generation).
step racecheck 60 sanitize racecheck kns=pym4 -- tests/test_sinkhorn_cuda.py tests/test_m4.py
step bench_contrastive 70 "$PY" benchmarks/bench_contrastive.py --device cuda --out "$OUT"
step bench_m4 70 "$PY" benchmarks/bench_m4.py --device cuda --sizes 1e5,1e6,1e7 --out "$OUT"
log "done (status $status)"
exit $status
