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

test: $(BIN)/.installed
	$(BIN)/python -m pytest

lint: $(BIN)/.installed
	$(BIN)/ruff check pyro_vae tests scripts

clean:
	rm -rf $(VENV) runs .pytest_cache
