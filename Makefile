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

# The same kit on the OLDEST releases pyproject.toml allows of the libraries whose APIs it leans on
# (transformers, peft, accelerate, trl: pins from .ci/lowest_pins.py), in a second virtualenv; CI runs the
# model, generation, trainer and merge tests there (the full suite runs on the newest, `make test`).
OLDEST ?= .venv-oldest
OLDEST_PY := $(OLDEST)/bin/python
OLDEST_TESTS ?= tests/test_modeling_cogvlm.py tests/test_generation.py tests/test_recipe.py tests/test_run_folder.py \
	tests/test_merge.py tests/test_versions.py tests/test_warnings.py tests/test_linear_cross_entropy.py
# `cogtune check` trains twice to watch the loss drop (the slowest test); the APIs it uses are covered above.
OLDEST_DESELECT ?= -k "not test_check_passes_and_fails_when_loss_cannot_drop"

$(OLDEST)/.installed: pyproject.toml .ci/lowest_pins.py
	python3 -m venv $(OLDEST)
	$(OLDEST_PY) -m pip install -q --upgrade pip
	$(OLDEST_PY) -m pip install -q "$(TORCH)"
	python3 .ci/lowest_pins.py > $(OLDEST)/pins.txt
	$(OLDEST_PY) -m pip install -q -c $(OLDEST)/pins.txt -e ".[dev]"
	touch $@

test-oldest: $(OLDEST)/.installed
	$(OLDEST_PY) -m pip freeze | grep -iE '^(torch|transformers|peft|accelerate|trl)=='
	$(OLDEST_PY) -m pytest $(OLDEST_DESELECT) $(OLDEST_TESTS)

.PHONY: install demo test test-oldest
