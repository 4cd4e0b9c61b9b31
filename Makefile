# Two entry points, each self-sufficient from a fresh clone:
#   make demo   create .venv, install, run the embedded synthetic benchmark end to end
#   make test   create .venv, install (with dev extras), lint, run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/pip install --constraint constraints.txt
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)

.PHONY: demo test lint format install clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(PIP) torch==2.14.1 torchvision==0.29.1
	$(PIP) -e '.[cpu,dev]'
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/wsss demo --out demo_out

lint: $(STAMP)
	$(BIN)/ruff check wsss tests benchmarks
	$(BIN)/ruff format --check wsss tests benchmarks

format: $(STAMP)
	$(BIN)/ruff check --fix wsss tests benchmarks
	$(BIN)/ruff format wsss tests benchmarks

test: lint
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) demo_out .pytest_cache .ruff_cache
