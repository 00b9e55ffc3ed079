# layer4lab developer commands. `make test` is what CI runs (see .ci/run).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat requirements.txt requirements-dev.txt | cksum | cut -d' ' -f1)

.PHONY: setup lint test unit integration e2e lab-tests certs up down bench bench-quick bench-instructions clean

# A virtual environment with the pinned requirements (re-made when they change).
$(STAMP): requirements.txt requirements-dev.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "Python 3.11 or newer is required (set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	@rm -f $(VENV)/.installed-*
	@touch $@

setup: $(STAMP)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

unit: setup
	$(BIN)/python -m pytest tests/unit -q

integration: setup
	$(BIN)/python -m pytest tests/integration -q

# The README's test command: static checks, then every test tier (and the 15 slowest
# tests, to keep the whole under 15 minutes).
test: lint
	$(BIN)/python -m pytest -q --durations=15

# The testcontainers tier alone (builds missing images; never pulls).
e2e: setup
	$(BIN)/python -m pytest tests/e2e -q

# The lab driver's scenarios (lab.py through labkit) alone.
lab-tests: setup
	$(BIN)/python -m pytest tests/lab -q

# The lab: the virtual environment (python3 lab.py re-runs itself in it), every image
# built offline (compose plugin and base image included), then certgen, the proxy,
# three upstreams, five clients and Prometheus in the background.
up: setup
	scripts/setup
	docker compose up -d
	@echo "lab is up: docker compose logs -f client-b; python3 lab.py watch --compose; Prometheus on http://127.0.0.1:$${LAYER4LAB_PROMETHEUS_PORT-9090}   (make down removes it)"

# Fault helpers of the compose lab (python lab.py fault add --compose) go first: they
# live in its containers' network namespaces.
down:
	docker ps -aq --filter label=layer4lab.fault --filter label=com.docker.compose.project=$${COMPOSE_PROJECT_NAME:-layer4lab} | xargs -r docker rm -f >/dev/null
	docker compose down -v --remove-orphans

# Side-by-side benchmarks against HAProxy (installed from Debian if missing); writes
# bench/results/latest.json. The full run: three rounds of the three CPU placements
# (about 18 minutes here); the quick one (the proxy alone on a CPU, once) < 2 min.
bench: setup
	$(BIN)/python bench/run.py --placements all --repeat 3

bench-quick: setup
	$(BIN)/python bench/run.py --quick

# Instructions per connection under valgrind (ours, HAProxy, the Python floor): the
# figure that does not move with the machine's load, to steer by (~5 minutes).
bench-instructions: setup
	$(BIN)/python bench/instructions.py

# Certificates for running the proxy by hand (never committed: certs/ is ignored).
certs: setup
	$(BIN)/python certgen/certgen.py --out certs

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
