# `make run`: create .venv, install, train on the default data set, write runs/quickstart.
# `make test`: create .venv, install, run the whole test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUN ?= runs/quickstart
EPOCHS ?= 10

.PHONY: run test lint clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

run: $(BIN)/.installed
	$(BIN)/pyro-vae train --out $(RUN) --epochs $(EPOCHS) --force

# A light Python 3.12 environment with arviz 1.x (and numpy) for the ArviZ adapter test;
# skipped (and that test with it) where no python3.12 exists.
.venv312/.installed:
	@if PYENV_VERSION=3.12.1 python3.12 --version >/dev/null 2>&1; then \
		PYENV_VERSION=3.12.1 python3.12 -m venv .venv312 && \
		.venv312/bin/python -m pip install --quiet 'arviz>=1' numpy && touch $@; \
	else echo "no python3.12 here: the arviz 1.x adapter test will skip"; fi

# two workers (pytest-xdist), one OpenMP thread each (tests/conftest.py): the suite's
# subprocesses and its compute overlap on two cores; JOBS=0 runs it in one process
JOBS ?= 2

test: $(BIN)/.installed .venv312/.installed
	$(BIN)/python -m pytest -n $(JOBS)

lint: $(BIN)/.installed
	$(BIN)/ruff check pyro_vae tests scripts

clean:
	rm -rf $(VENV) .venv312 runs .pytest_cache
