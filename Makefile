# `make up` and `make test` work on a fresh clone: they create .venv and install what is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: up test lint unit e2e conformance bench bench-write bench-guided bench-guided-serving bench-switch bench-agent soak blas clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev,bench]"
	touch $(STAMP)

up: $(STAMP) blas
	$(BIN)/mlxtg up $(ARGS)

# On Debian/Ubuntu, offer the fast BLAS the workers preload (the mlx[cpu] wheel's own is ~40x slower).
blas:
	@if [ "$$(uname)" = "Linux" ] && [ ! -e /usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 ] \
	  && [ ! -e /usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3 ] && command -v apt-get >/dev/null; then \
	  echo "Tip: 'sudo apt-get install libopenblas0-pthread' makes CPU inference ~10-40x faster."; fi

lint: $(STAMP)
	$(BIN)/ruff check mlxtg tests bench
	$(BIN)/mypy mlxtg

unit: $(STAMP)
	$(BIN)/pytest -m "not slow" $(ARGS)

e2e: $(STAMP)
	$(BIN)/pytest -m slow $(ARGS)

test: lint $(STAMP)
	$(BIN)/pytest $(ARGS)

# schemathesis against our own /openapi.json on a real server: zero 5xx, documented answers.
conformance: $(STAMP)
	$(BIN)/python -m bench.conformance $(ARGS)

bench: $(STAMP)
	$(BIN)/python -m bench.bench_serving $(ARGS)

bench-write: $(STAMP)
	$(BIN)/python -m bench.bench_serving --write $(ARGS)

bench-guided: $(STAMP)
	$(BIN)/python bench/bench_guided.py $(ARGS)

bench-guided-serving: $(STAMP)
	$(BIN)/python -m bench.bench_guided_serving $(ARGS)

bench-switch: $(STAMP)
	$(BIN)/python -m bench.bench_switch $(ARGS)

bench-agent: $(STAMP)
	$(BIN)/python -m bench.bench_agent $(ARGS)

# N clients x M minutes of mixed traffic with disconnects on a real server (issue 14); ARGS="--write" records it.
soak: $(STAMP)
	$(BIN)/python -m bench.soak $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
