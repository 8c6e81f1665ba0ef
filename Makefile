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
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet ".[dev]"
	@touch $(STAMP)

setup: $(STAMP)

migrate: setup
	$(BIN)/python manage.py migrate --noinput
	$(BIN)/python manage.py load_reference_data
	$(BIN)/python manage.py setup_periodic_tasks

# Web (127.0.0.1:8000), Celery worker and beat together; Ctrl-C stops all three.
run: migrate
	$(BIN)/python manage.py load_demo_data
	@echo ""
	@echo "  Axiom Energy Grid is starting on http://127.0.0.1:8000/"
	@echo "  Admin:  http://127.0.0.1:8000/admin/   login: admin / admin (demo)"
	@echo "  Database: $${DATABASE_URL:-SQLite under var/}   Broker: $${REDIS_URL:-filesystem under var/}"
	@echo ""
	PATH="$(CURDIR)/$(BIN):$$PATH" DEBUG=$${DEBUG:-true} $(BIN)/honcho -f Procfile start

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf var/ .pytest_cache

# Benchmarks (docs/benchmarks.md): PostgreSQL and Redis on loopback, gunicorn, one table at the end, in the
# bench's own databases. `bench` installs wrk from Debian's packages when it can (root with apt-get), else
# the built-in Python load generator is used; `bench-quick` needs nothing beyond PostgreSQL (< 2 minutes).
.PHONY: bench bench-quick
bench: setup
	@command -v wrk >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; } || \
		echo "wrk is not available: the built-in Python load generator is used"
	$(BIN)/python -m bench.run $(BENCH_ARGS)

bench-quick: setup
	$(BIN)/python -m bench.run --quick $(BENCH_ARGS)
