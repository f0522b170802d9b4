# Two commands on a fresh machine: `make demo` (the tiny end-to-end demo) and `make test`.
# Both create .venv on first use: the CPU torch wheel first (a plain `torch` requirement would pull a
# multi-GB CUDA build), then the kit in editable mode with its dev tools.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) train.py

test: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m pytest

.PHONY: install demo test
