# The one entry point: run, test, lint, bench. CI calls `make test` through .ci/run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint bench soak system-deps clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,dev]'
	touch $(STAMP)

# redis-server, redis-sentinel, nginx and wrk from the distro; installed when missing and root, else a one-line hint.
system-deps:
	@missing=""; \
	for b in redis-server redis-sentinel nginx wrk; do \
	  command -v $$b >/dev/null 2>&1 || [ -x /usr/sbin/$$b ] || [ -x /usr/bin/$$b ] || missing="$$missing $$b"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing:$$missing"; \
	    (apt-get install -y -q redis-server redis-sentinel nginx wrk >/dev/null 2>&1 || \
	     (apt-get update -q >/dev/null && apt-get install -y -q redis-server redis-sentinel nginx wrk >/dev/null)) || \
	     { echo "could not install:$$missing; run: apt-get install redis-server redis-sentinel nginx wrk"; exit 1; }; \
	  else \
	    echo "missing:$$missing; install them with: sudo apt-get install redis-server redis-sentinel nginx wrk"; exit 1; \
	  fi; \
	fi

run: $(STAMP)
	$(PY) -m sidecar.dev

test: $(STAMP) system-deps
	$(PY) -m pytest -q -p no:cacheprovider

lint: $(STAMP)
	$(VENV)/bin/ruff check sidecar tests
	$(VENV)/bin/mypy -p sidecar

bench: $(STAMP) system-deps
	$(PY) -m tests.bench

# A longer soak than the 20 s one in `make test`: three minutes of mixed traffic with refreshes.
soak: $(STAMP) system-deps
	SIDECAR_SOAK_SECONDS=180 $(PY) -m pytest -q -p no:cacheprovider tests/e2e/test_operations.py -k soak -o timeout=400

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
