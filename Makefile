# The two commands a newcomer runs (README): `make demo` and `make test`.
# Each creates .venv and installs what it needs; nothing else is required.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: demo test bench bench-cp conformance lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/meshlet demo $(DEMO_ARGS)

# CI runs `make test` only, so the lint runs first.
test: lint
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: $(VENV)/.installed
	$(PY) benchmarks/run.py $(BENCH_ARGS)

bench-cp: $(VENV)/.installed
	$(PY) benchmarks/cp_scale.py $(BENCH_CP_ARGS)

# The public HTTP/1.1 suites against the sidecar's listeners, HAProxy beside (needs Debian's
# haproxy and the suites cloned into CONFORMANCE_SUITES: `make conformance` says how).
conformance: $(VENV)/.installed
	CONFORMANCE_SUITES=$(CONFORMANCE_SUITES) $(PY) benchmarks/conformance/run.py $(CONFORMANCE_ARGS)

# Style (ruff), types (mypy, configured in pyproject.toml) and the import contracts between
# the packages and layers (import-linter, [tool.importlinter] in pyproject.toml).
LINTED := meshlet sidecar control_plane tests benchmarks examples

lint: $(VENV)/.installed
	$(PY) -m ruff check $(LINTED)
	$(PY) -m ruff format --check $(LINTED)
	$(PY) -m mypy
	$(VENV)/bin/lint-imports --no-logo

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .ruff_cache .mypy_cache .import_linter_cache *.egg-info
