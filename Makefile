# The one entry point: run, test, lint, bench. CI calls `make test` through .ci/run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint bench soak system-deps node-deps clean

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

# The official MCP TypeScript SDK for tests/e2e/test_mcp_sdk.py, from the committed package-lock.json (npm ci).
# node (20+) and npm come from the distro: installed when missing and root, else a one-line hint; never skipped.
MCP_JS := tests/e2e/mcp
MCP_JS_STAMP := $(MCP_JS)/node_modules/.package-lock.json
node-deps: $(MCP_JS_STAMP)

$(MCP_JS_STAMP): $(MCP_JS)/package.json $(MCP_JS)/package-lock.json
	@if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing: nodejs npm"; \
	    (apt-get install -y -q nodejs npm >/dev/null 2>&1 || \
	     (apt-get update -q >/dev/null && apt-get install -y -q nodejs npm >/dev/null)) || \
	     { echo "could not install node; run: apt-get install nodejs npm (Node.js 20 or newer)"; exit 1; }; \
	  else \
	    echo "missing: node/npm (Node.js 20 or newer), needed by the MCP SDK tests; install: sudo apt-get install nodejs npm"; exit 1; \
	  fi; \
	fi
	@node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 20 ? 0 : 1)' || \
	  { echo "node $$(node --version) is too old for @modelcontextprotocol/sdk: install Node.js 20 or newer"; exit 1; }
	cd $(MCP_JS) && npm ci --no-audit --no-fund --loglevel=error
	touch $(MCP_JS_STAMP)

run: $(STAMP)
	$(PY) -m sidecar.dev

test: $(STAMP) system-deps node-deps
	$(PY) -m pytest -q -p no:cacheprovider

lint: $(STAMP)
	$(VENV)/bin/ruff check sidecar tests
	$(VENV)/bin/mypy -p sidecar

bench: $(STAMP) system-deps
	$(PY) -m tests.bench

# RSS over 30 minutes of mixed traffic (2 replicas, 20 users, 5 s tokens, ~137 req/s, Redis restarted every
# 90 s): one line every 10 s and the slope after the warm-up. SOAK_MINUTES=5 make soak for a shorter one.
SOAK_MINUTES ?= 30
soak: $(STAMP) system-deps
	$(PY) -m tests.bench.soak --minutes $(SOAK_MINUTES)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache $(MCP_JS)/node_modules
