# Quick start: `make demo` (set up .venv, build, run the demo) and `make test` (set up, build, run the tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CUDA kernels are compiled whenever a CUDA toolkit is found (setup.py, which also sets the
# default TORCH_CUDA_ARCH_LIST); MAX_JOBS bounds the parallel compile jobs.
export MAX_JOBS ?= 2
# The emulated CUDA library kdkernels._emu too (docs/emulator.md): the tests run every CUDA test case on
# it (marker `emu`). KDKERNELS_EMU=0 skips it (those cases are then skipped).
export KDKERNELS_EMU ?= 1

.PHONY: setup build demo test bench dist-check cmake-check clean

$(VENV)/.deps:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch>=2.4" numpy pybind11 ninja setuptools wheel pytest pytest-benchmark
	touch $@

$(VENV)/.built: $(VENV)/.deps setup.py pyproject.toml $(shell find csrc -type f)
	$(PY) -m pip install -q --no-build-isolation -e .
	$(PY) -m kdkernels info
	touch $@

setup: $(VENV)/.built
build: $(VENV)/.built

# The optional [plot] extra (matplotlib) draws the demo's loss curves; without it the demo says how to get them.
$(VENV)/.plotdeps: $(VENV)/.deps
	$(PY) -m pip install -q "matplotlib>=3.7" || echo "matplotlib not installed: the demo runs without its plot"
	touch $@

demo: $(VENV)/.built $(VENV)/.plotdeps
	$(PY) -m kdkernels demo $(DEMO_ARGS)

# The optional [hf], [peers] and [plot] extras too, so the Hugging Face integration, the peers' conventions
# (docs/conventions.md) and the plots are tested rather than skipped; the installed torch is pinned so no peer moves it.
$(VENV)/.testdeps: $(VENV)/.deps
	$(PY) -m pip freeze | grep -i '^torch==' > $(VENV)/torch-pin.txt
	$(PY) -m pip install -q -c $(VENV)/torch-pin.txt "transformers>=4.48" "accelerate>=0.26" \
		"trl>=1.16" "POT>=0.9.7" "nvidia-modelopt>=0.47" requests "megatron-core>=0.16" "matplotlib>=3.7"
	touch $@

test: $(VENV)/.built $(VENV)/.testdeps
	$(PY) -m pytest tests -q -ra $(PYTEST_ARGS)

# pytest-benchmark over benchmarks/test_bench_<op>.py, then the markdown table of bench.json;
# BENCH_ARGS e.g. "topk_kl --kdk-quick" or "--kdk-device cuda --benchmark-compare".
bench: $(VENV)/.built
	$(PY) -m kdkernels bench $(BENCH_ARGS)

# The sdist, the wheel built from it, each installed into a fresh venv (--no-build-isolation), one loss run.
dist-check: $(VENV)/.deps
	bash tools/dist_check.sh $(abspath $(PY))

# Configure and build CMakeLists.txt (CPU-only) so the native build cannot rot.
cmake-check: $(VENV)/.deps
	cmake -S . -B build-cmake -G Ninja -DPython3_EXECUTABLE=$(abspath $(PY)) -DCMAKE_BUILD_TYPE=Release \
	      -DCMAKE_MAKE_PROGRAM=$(abspath $(VENV)/bin/ninja)
	cmake --build build-cmake -j $(MAX_JOBS)

clean:
	rm -rf build build-cmake dist kdkernels/*.so *.egg-info $(VENV)/.built
