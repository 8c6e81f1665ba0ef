# The two commands of the README: `make run` and `make test`. Both set up .venv first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test setup migrate lint format clean

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "$(PYTHON) is needed (set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)

# Reinstall only when the pinned dependencies change.
$(STAMP): pyproject.toml clients/python/pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet ".[dev]" --editable ./clients/python
	@touch $(STAMP)

setup: $(STAMP)

# PostgreSQL is the only database. Without DATABASE_URL, commands that need it run under the embedded
# server's launcher (axiom_grid/embedded_postgres.py): it starts PostgreSQL 18 with its data in var/postgres,
# sets DATABASE_URL for the command and stops the server when the command ends. With DATABASE_URL it starts
# nothing. `make test` needs no launcher: the test session starts the embedded server itself (tests/conftest.py).
WITH_DATABASE := $(BIN)/python -m axiom_grid.embedded_postgres --
MANAGE := $(BIN)/python manage.py
PREPARE := $(MANAGE) migrate --noinput && $(MANAGE) load_reference_data && $(MANAGE) setup_periodic_tasks
DATABASE_NOTE := $(if $(DATABASE_URL),the server in DATABASE_URL,embedded PostgreSQL 18 in var/postgres at $$DATABASE_URL)
BROKER_NOTE := $(if $(REDIS_URL),$(REDIS_URL),filesystem under var/broker)

migrate: setup
	$(WITH_DATABASE) sh -c '$(PREPARE)'

# gunicorn (127.0.0.1:8000), a Celery worker and beat from the Procfile (axiom_grid/procfile.py); Ctrl-C stops
# the three, then the embedded database. The database is started once for the preparation and the service.
run: setup
	@DEBUG=$${DEBUG:-true} $(WITH_DATABASE) sh -c '$(PREPARE) && $(MANAGE) load_demo_data && \
		echo "" && \
		echo "  Axiom Energy Grid is starting on http://127.0.0.1:8000/" && \
		echo "  Admin:  http://127.0.0.1:8000/admin/   login: admin / admin (demo)" && \
		echo "  Database: $(DATABASE_NOTE)" && \
		echo "  Broker: $(BROKER_NOTE)" && \
		echo "" && \
		PATH="$(CURDIR)/$(BIN):$$PATH" exec $(BIN)/python -m axiom_grid.procfile Procfile'

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# var/ holds the embedded database: a server left running by a killed command is stopped first, and
# nothing is removed while a command still uses it.
clean:
	@if [ -x $(BIN)/python ]; then $(BIN)/python -m axiom_grid.embedded_postgres --stop; \
	elif [ -f var/postgres/postmaster.pid ]; then echo "the embedded PostgreSQL in var/postgres may be running"; exit 1; fi
	rm -rf var/ .pytest_cache

# Benchmarks (docs/benchmarks.md): PostgreSQL and Redis on loopback, gunicorn, one table at the end, in the
# bench's own databases. `bench` installs wrk from Debian's packages when it can (root with apt-get), else
# the built-in Python load generator is used; `bench-quick` needs nothing beyond PostgreSQL (a few minutes).
# The sweeps' fleet size: `make bench AGENTS=300000` (or BENCH_ARGS="--agents 300000"; default a million).
.PHONY: bench bench-quick
bench: setup
	@command -v wrk >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; } || \
		echo "wrk is not available: the built-in Python load generator is used"
	$(BIN)/python -m bench.run $(if $(AGENTS),--agents $(AGENTS)) $(BENCH_ARGS)

bench-quick: setup
	$(BIN)/python -m bench.run --quick $(BENCH_ARGS)
