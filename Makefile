# The two commands of the README. Each creates the virtual environment on first use.
#   make demo   simulator -> daemon -> shipped model for 20 s: stats table + stemd-demo.png
#   make test   the test suite
#   make lint   ruff, mypy and the import contracts (import-linter) of pyproject.toml
# TORCH picks the torch build: the default is the CPU wheel; on a CUDA PC use e.g. TORCH=torch==2.13.0
# with the CUDA index of your choice, or install torch yourself first and pass TORCH=torch.
PY ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo test lint install clean
demo: $(VENV)/.installed
	$(BIN)/stemd demo

test: $(VENV)/.installed lint
	$(BIN)/python -m pytest -q

lint: $(VENV)/.installed
	$(BIN)/ruff check stemd tests bench
	$(BIN)/mypy stemd
	$(BIN)/lint-imports

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test,bench,dev,dask,metrics,formats]"
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
