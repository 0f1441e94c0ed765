# procsky: `make demo` runs the tiny end-to-end campaign; `make test` runs the tests;
# `make lint` checks style, format and types. All create .venv when missing and install procsky into it.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed-test
DEMO_STAMP := $(VENV)/.installed-demo
PYTEST_ARGS ?=
# pytest-xdist: one test process per core (at most 4), a test file's tests in one process
# (their module fixtures are built once); TEST_WORKERS=0 runs everything in this process.
TEST_WORKERS ?= auto
XDIST := -n $(TEST_WORKERS) --maxprocesses 4 --dist loadfile --no-loadscope-reorder

.PHONY: demo test test-fast test-slow lint bench clean venv

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(DEMO_STAMP): pyproject.toml | $(PY)
	$(PIP) install --quiet -e ".[sim,hpc]"
	touch $@

$(STAMP): pyproject.toml | $(PY)
	$(PIP) install --quiet -e ".[sim,hpc,postgres,test]"
	touch $@ $(DEMO_STAMP)

venv: $(STAMP)

demo: $(DEMO_STAMP)
	$(PY) -m procsky.demo

## test: the whole suite, fast tests and slow end-to-end runs, in one session (the longest
## files start first: tests/conftest.py::LONGEST_FIRST); test-fast / test-slow run one part
test: $(STAMP)
	$(PY) -m pytest $(XDIST) $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(XDIST) $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -m slow $(XDIST) $(PYTEST_ARGS)

## lint: ruff (lint and format, configured in pyproject.toml) and mypy; every check runs, then make fails if one did
lint: $(STAMP)
	@status=0; \
	$(VENV)/bin/ruff check . || status=1; \
	$(VENV)/bin/ruff format --check . || status=1; \
	$(VENV)/bin/mypy procsky || status=1; \
	exit $$status

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf demo-out build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
