VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint clean test-tools

# The browser test wants Debian's chromium and the REPL test tmux: installed when missing, as root with apt
# (CI); otherwise those tests are skipped and say why.
test-tools:
	@missing=""; for tool in chromium tmux; do command -v $$tool >/dev/null || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			(DEBIAN_FRONTEND=noninteractive apt-get install -y -qq$$missing >/dev/null 2>&1 || \
			 { apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq$$missing >/dev/null 2>&1; }) || \
			echo "*** could not install$$missing: the browser/REPL tests will be skipped ***"; \
		else echo "*** missing$$missing (not root or no apt): the browser/REPL tests will be skipped ***"; fi; \
	fi

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m ember.kernels
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/ember run

test: $(STAMP) test-tools
	$(VENV)/bin/ruff check ember tests scripts benchmarks
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check ember tests scripts benchmarks

clean:
	rm -rf $(VENV)
