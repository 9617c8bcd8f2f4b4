PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

demo: $(STAMP)
	$(BIN)/sclseg demo --out runs/demo

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_losses.py --out runs/bench_losses.json

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
