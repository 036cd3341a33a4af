# Two entry points: `make demo` (the main job) and `make test`. Each creates .venv when needed.
PYTHON ?= python3
VENV ?= .venv
# The torch requirement of the package is a normal range (torch>=2.1). This default is the range
# the project is tested against; CI pins the CPU build (TORCH_SPEC=torch==2.13.0). For a GPU build
# set e.g. TORCH_SPEC='torch==2.5.1' or install torch into the venv yourself first.
TORCH_SPEC ?= torch>=2.1,<2.14
DEMO_ARGS ?=
BIN := $(VENV)/bin

.PHONY: demo test install clean

$(BIN)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/disback demo $(DEMO_ARGS)

test: $(BIN)/.installed
	$(BIN)/ruff check disback_core adapters
	$(BIN)/ruff format --check disback_core adapters
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
