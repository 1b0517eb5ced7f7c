# Front door:  make demo   (installs into .venv if needed, runs the offline demo)
#              make test   (installs into .venv if needed, runs the test suite)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ldke-installed

.PHONY: demo test test-only install bench-smoke clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test,plots]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ldke demo

test: $(STAMP)
	$(MAKE) test-only

test-only:
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q --durations=15 --timeout=900 tests

bench-smoke: $(STAMP)
	$(VENV)/bin/ldke bench --suite smoke --out benchmarks/results/smoke

clean:
	rm -rf $(VENV) .pytest_cache
