# The two commands a newcomer needs: `make demo` and `make test`.
# Everything installs into .venv; nothing outside it is touched except Debian packages
# the tests need (installed with apt-get when run as root, otherwise named and the run stops).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Debian packages the acceptance tests drive for real.
TEST_DEBS := etcd-server etcd-client haproxy nginx prometheus redis-server redis-sentinel wrk iproute2 faketime chromium chromium-driver
PYTEST_ARGS ?=
# Test files run on this many workers (pytest-xdist, one file stays on one worker so its
# module fixtures start once); most of the suite waits on real processes.
PYTEST_WORKERS ?= 2

# `make chaos`: seeded fault schedules against real agents, checked (tests/chaos/README.md).
SCHEDULES ?= 20
SEED      ?= 1
AGENTS    ?= 3
BACKEND   ?= raft
DURATION  ?= 30
CHAOS_OUT ?= chaos-out
CHAOS_ARGS ?=

.PHONY: demo test lint format venv system-deps clean unit chaos

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/controlplane demo

lint: $(STAMP)
	$(BIN)/ruff check controlplane tests bench
	$(BIN)/ruff format --check controlplane tests bench
	$(BIN)/mypy --strict controlplane
	$(BIN)/lint-imports

format: $(STAMP)
	$(BIN)/ruff format controlplane tests bench
	$(BIN)/ruff check --fix controlplane tests bench

system-deps:
	@./scripts/ensure-system-deps $(TEST_DEBS)

unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit $(PYTEST_ARGS)

test: $(STAMP) system-deps lint
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

chaos: $(STAMP) system-deps
	$(BIN)/python -m controlplane.testing.chaos --schedules $(SCHEDULES) --seed $(SEED) \
		--agents $(AGENTS) --backend $(BACKEND) --duration $(DURATION) --out $(CHAOS_OUT) --quiet $(CHAOS_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .hypothesis chaos-out
