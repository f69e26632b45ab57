# Entry points for developers and CI (.ci/run runs `make test`).
#   make test           venv + deps, lint, then pytest with Kafka and Redis up
#   make lint           ruff check, ruff format --check, mypy --strict
#   make demo           `drl demo` (docs/demo.md) against the local Kafka broker
#   make bench          the benchmarks (benchmarks/, results in docs/benchmarks.md)
#   make services-up    start the local Kafka (KRaft) broker and Redis (scripts/services)
#   make services-down  stop them
# Services started by `make test` / `make demo` are stopped again when they finish; services that
# were already running are left alone (scripts/with-services). Set DRL_KAFKA_BOOTSTRAP and/or
# DRL_REDIS_URL to use existing ones instead.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.drl-installed
# Python for the stdlib-only service scripts: the venv's when it exists (its confluent-kafka gives
# a real metadata readiness probe), else the system one.
SERVICES_PY = $(if $(wildcard $(PY)),$(PY),$(PYTHON))

PACKAGES := limiter producer aggregator
# Only packages that already hold Python files (mypy rejects an empty directory).
TYPED_PACKAGES = $(foreach p,$(PACKAGES),$(if $(wildcard $(p)/*.py),$(p)))
# Typed code outside the packages, checked as strictly.
TYPED_EXTRA := scripts/drl_services.py tests/conftest.py tests/foundation benchmarks
PYTEST_ARGS ?=

.PHONY: test lint demo bench services-up services-down services-status

$(PY):
	$(PYTHON) -m venv $(VENV)

# Reinstalled when pyproject.toml, setup.py or the compiled request path is newer than the stamp.
$(STAMP): pyproject.toml setup.py limiter/_requestpath.c | $(PY)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test,dev]'
	@touch $@

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy --strict $(TYPED_PACKAGES) $(TYPED_EXTRA)

test: lint
	$(PY) scripts/with-services -- $(PY) -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) scripts/with-services -s kafka -- $(VENV)/bin/drl demo

# The benchmarks need the `bench` extra (the `limits` library, a peer to compare against).
bench: $(STAMP)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[bench]'
	$(PY) benchmarks/bench_local.py

services-up:
	$(SERVICES_PY) scripts/services up

services-down:
	$(SERVICES_PY) scripts/services down

services-status:
	$(SERVICES_PY) scripts/services status
