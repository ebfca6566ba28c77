# Marketplace — the two commands a new user needs: `make standalone` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
EXTRAS ?= dev,standalone,ml
PYTEST_ARGS ?=

.PHONY: install system-deps vision standalone test lint proto proto-check fuzz bench clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[$(EXTRAS)]'
	touch $@

# Debian tools the tests use for real: gVisor, bubblewrap, compose, promtool, PgBouncer and kubectl.
system-deps:
	@missing=""; \
	for pair in runsc:runsc bwrap:bubblewrap docker-compose:docker-compose promtool:prometheus pgbouncer:pgbouncer kubectl:kubectl; do \
	  bin=$${pair%%:*}; pkg=$${pair##*:}; command -v $$bin >/dev/null || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "run as root or: sudo apt-get install$$missing" >&2; exit 1; fi; \
	fi

# torchvision cannot live beside .venv's CPU torch: resnet50 nodes (and its e2e test) use .venv-vision.
vision: $(VENV)/.installed
	./scripts/setup-vision-venv.sh

standalone: install
	$(VENV)/bin/marketplace standalone

test: install system-deps vision
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# Schemathesis over /openapi.json, ten times the examples `make test` runs, new ones each time.
fuzz: install
	MARKETPLACE_FUZZ_EXAMPLES=$${MARKETPLACE_FUZZ_EXAMPLES:-300} $(VENV)/bin/pytest -q tests/api/test_api_fuzz.py

lint: install
	$(VENV)/bin/ruff check .

proto: install
	./scripts/generate.sh

proto-check: install
	./scripts/generate.sh --check

# Each prints its numbers next to a plain-Celery (or direct-call) baseline measured in the same run;
# fanout, batching, latency, inference and warm_start on `marketplace standalone` as shipped.
bench: install
	cd bench && ../$(PY) fanout.py --mode standalone
	cd bench && ../$(PY) fanout.py --mode credentials --n 100 1000
	cd bench && ../$(PY) batching.py --mode standalone
	cd bench && ../$(PY) latency.py --mode standalone
	cd bench && ../$(PY) api_load.py
	cd bench && ../$(PY) event_streams.py
	cd bench && ../$(PY) inference.py --mode standalone
	cd bench && ../$(PY) warm_start.py --mode standalone
	cd bench && ../$(PY) billing_audit.py
	cd bench && ../$(PY) daily_spend.py
	cd bench && ../$(PY) fairness.py
	cd bench && ../$(PY) audit_verify.py
	cd bench && ../$(PY) redundancy.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
