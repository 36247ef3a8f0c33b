VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m ember.kernels
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/ember run

test: $(STAMP)
	$(VENV)/bin/ruff check ember tests scripts benchmarks
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check ember tests scripts benchmarks

clean:
	rm -rf $(VENV)
