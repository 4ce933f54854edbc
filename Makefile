# The two commands of the README. Each creates .venv and installs segkd on first use; both can be run again.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test quickstart install lint

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check segkd tests examples
	$(BIN)/python -m pytest -q

quickstart: $(STAMP)
	$(BIN)/python examples/quickstart.py --out quickstart-out

lint: $(STAMP)
	$(BIN)/ruff check segkd tests examples
