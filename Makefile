# attnzoo: `make demo` and `make test` bootstrap .venv (Python 3.12) themselves.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python

# Find a working Python 3.12: PATH first, then pyenv.
PYTHON312 := $(shell \
  for c in python3.12 "$$(command -v pyenv >/dev/null 2>&1 && pyenv root)/versions/"3.12*/bin/python3.12; do \
    if [ -n "$$c" ] && "$$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1; then \
      command -v "$$c" 2>/dev/null || echo "$$c"; break; fi; \
  done)

.PHONY: demo test lint clean

$(VENV)/.installed: requirements.txt setup.py
	@if [ -z "$(PYTHON312)" ]; then \
	  echo "error: no working Python 3.12 found (tried python3.12 on PATH and pyenv versions 3.12.*); install Python 3.12" >&2; exit 1; fi
	@echo "using $(PYTHON312)"
	$(PYTHON312) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

demo: $(VENV)/.installed
	$(PY) -m attnzoo demo

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 --durations=15 tests

clean:
	rm -rf $(VENV) *.egg-info
