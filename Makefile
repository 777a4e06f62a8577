# `make demo` and `make test` set everything up on a fresh clone: a virtual environment in
# .venv with torch and rnnkit (editable) and the test tools, rebuilt when pyproject.toml changes,
# and the fused CPU engine's kernels, built (or found in the cache) before the first forward.

PY ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
# pytest-xdist workers for `make test`
WORKERS ?= 2
PYTEST_ARGS ?=
DEMO_ARGS ?=
CHECK_ARGS ?=
BENCH_ARGS ?=

BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --no-input
STAMP := $(VENV)/.stamp
BENCH_STAMP := $(VENV)/.stamp-bench

.PHONY: all venv kernels demo test lint format check bench clean

all: test

venv: $(STAMP)

# torch first, pinned: rnnkit asks for torch>=2.1, which the pinned build then satisfies, so
# pip never resolves (and downloads) a different torch. The triton extra (Linux only) lets the
# Triton engine's tests run in Triton's interpreter on CPU.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(PIP) install "torch==$(TORCH_VERSION)"
	$(PIP) install -e ".[test,triton]"
	touch $@

# A no-op when this environment's build is cached. A failed build is reported and does not
# stop the target: engine="auto" then runs the reference engine.
kernels: $(STAMP)
	-$(BIN)/rnnkit build

$(BENCH_STAMP): $(STAMP)
	$(PIP) install -e ".[test,triton,bench]"
	touch $@

demo: kernels
	$(BIN)/rnnkit demo $(DEMO_ARGS)

test: kernels
	$(BIN)/ruff check src tests
	$(BIN)/python -m pytest -n $(WORKERS) -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

format: $(STAMP)
	$(BIN)/ruff check --fix src tests
	$(BIN)/ruff format src tests

check: kernels
	$(BIN)/rnnkit check $(CHECK_ARGS)

bench: $(BENCH_STAMP) kernels
	$(BIN)/rnnkit bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
