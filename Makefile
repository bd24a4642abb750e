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

test: $(VENV)/.installed
	$(PY) -m ruff check meshlet sidecar control_plane tests benchmarks examples
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: $(VENV)/.installed
	$(PY) benchmarks/run.py $(BENCH_ARGS)

bench-cp: $(VENV)/.installed
	$(PY) benchmarks/cp_scale.py $(BENCH_CP_ARGS)

# The public HTTP/1.1 suites against the sidecar's listeners, HAProxy beside (needs Debian's
# haproxy and the suites cloned into CONFORMANCE_SUITES: `make conformance` says how).
conformance: $(VENV)/.installed
	CONFORMANCE_SUITES=$(CONFORMANCE_SUITES) $(PY) benchmarks/conformance/run.py $(CONFORMANCE_ARGS)

lint: $(VENV)/.installed
	$(PY) -m ruff check meshlet sidecar control_plane tests benchmarks examples
	$(PY) -m ruff format --check meshlet sidecar control_plane tests benchmarks examples

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .ruff_cache *.egg-info
