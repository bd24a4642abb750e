# The two commands a newcomer runs (README): `make demo` and `make test`.
# Each creates .venv and installs what it needs; nothing else is required.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: demo build test bench bench-cp conformance lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/meshlet demo $(DEMO_ARGS)

# The hot path compiled again (setup.py), after an edit to one of its modules: until then
# that module runs as Python, and says so on stderr.
build: $(VENV)/.installed
	$(PY) setup.py --quiet build_ext --inplace

# CI runs `make test` only, so the lint runs first. The whole suite runs on the compiled build,
# the unit suites once more on the .py modules (MESHLET_NO_EXTENSIONS=1): both are shipped.
PURE_SUITES := tests/sidecar/core tests/sidecar/layers tests/meshlet
test: lint
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)
	MESHLET_NO_EXTENSIONS=1 $(PY) -m pytest -m "not slow" $(PURE_SUITES)

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
	rm -rf $(VENV) .pytest_cache .hypothesis .ruff_cache .mypy_cache .import_linter_cache *.egg-info build
	find meshlet sidecar control_plane -name '*.so' -delete; rm -f meshlet/_compiled.txt
