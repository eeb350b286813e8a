# One entry point for humans and CI. Every target builds its own virtual environment.
#   make demo   - set up, then save/load a GPT-2-medium fp16 state dict with ckptio and torch
#   make test   - set up, then lint, run the C++ unit tests and the Python test suite
#   make bench  - the full comparison (ckptio vs torch, pickle and peers) -> bench/results/
#   make bench-pytest - the pytest-benchmark groups (torch beside ckptio, results checked)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.deps-installed

.PHONY: demo test install cpp-test py-test lint asan clean bench bench-pytest

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

py-test: install
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check python bench tests
	$(BIN)/ruff format --check python bench tests
	$(BIN)/mypy python/ckptio

test: lint cpp-test py-test

# C++ unit tests under AddressSanitizer + UBSan.
asan: $(STAMP)
	$(BIN)/cmake -S . -B build/asan -G Ninja -DCMAKE_MAKE_PROGRAM=$(abspath $(BIN))/ninja \
	    -DCMAKE_BUILD_TYPE=Debug -DCKPTIO_BUILD_PYTHON=OFF -DCKPTIO_BUILD_TESTS=ON -DCKPTIO_SANITIZE=ON
	$(BIN)/cmake --build build/asan
	$(BIN)/ctest --test-dir build/asan --output-on-failure

clean:
	rm -rf build $(VENV)
