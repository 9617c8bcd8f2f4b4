PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo bench digits-encoder clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest

demo: $(STAMP)
	$(BIN)/sclseg demo --out runs/demo --jobs 2

# Rebuild the digits default's pre-trained encoder (about 2 minutes on one core).
digits-encoder: $(STAMP)
	$(BIN)/python -m sclseg.digits_encoder --out src/sclseg/weights/compact16_digit_crops.pt

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_losses.py --out runs/bench_losses.json

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
