# One entry point for humans and CI. Every target builds its own virtual environment.
#   make demo   - set up, then save/load a GPT-2-medium fp16 state dict with ckptio and torch
#   make test   - set up, then lint, run the C++ unit tests and the Python test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.deps-installed

.PHONY: demo test install cpp-test py-test lint asan clean

$(STAMP): requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	touch $(STAMP)

install: $(STAMP)
	$(BIN)/python -m pip install -q --no-build-isolation .

demo: install
	$(BIN)/python bench/demo.py

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
