# Set-up is part of every target: .venv is (re)built when missing or when pyproject.toml changed.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

.PHONY: venv test demo demo-stop bench lint
venv: $(STAMP)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -q --durations=25

demo: $(STAMP)
	$(VENV)/bin/python -m jobs.demo $(ARGS)

demo-stop: $(STAMP)
	$(VENV)/bin/python -m jobs.demo --stop $(ARGS)

bench: $(STAMP)
	$(VENV)/bin/python -m bench

lint: $(STAMP)
	$(VENV)/bin/ruff check .
