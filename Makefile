# Set-up and the two jobs of README.md. Every target sets up .venv itself from nothing:
# torch 2.13.0 (the CPU wheel) first, so that nothing pulls a multi-GB CUDA build, then the
# build tools, then pym4 itself (editable, CPU-only core unless PYM4_CUDA says otherwise).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.pym4-setup
OUT    ?= demo_out
PYTEST_ARGS ?=

.PHONY: setup demo test bench cuda-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml CMakeLists.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q "scikit-build-core>=0.10" "pybind11>=2.12" cmake ninja
	PYM4_CUDA=$${PYM4_CUDA:-OFF} $(PY) -m pip install -q --no-build-isolation -e ".[test,triton,bench,ray,spark]"
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

clean:
	rm -rf build $(VENV) bench_out demo_out
