# Set-up and entry points. Every target installs into .venv first, so a fresh clone needs nothing else.
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.sidlib-installed
# Run tools from the venv, also inside DVC stages and papermill kernels.
export PATH := $(abspath $(VENV))/bin:$(PATH)
export VIRTUAL_ENV := $(abspath $(VENV))

.PHONY: install repro test test-unit test-notebooks bench clean-venv

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (sidlib)"
	touch $(STAMP)

# Regenerate every embedded result (params.yaml `run.benchmarks`); paper presets need GPUs, see README.
repro: install
	dvc config --local core.analytics false
	dvc repro

test: install test-unit test-notebooks

test-unit: install
	$(PY) -m pytest -q tests

# Notebooks run with smoke settings: they never write into reports/.
test-notebooks: install
	SIDLIB_SMOKE=1 $(PY) -m pytest -q --nbval notebooks/

bench: install
	$(PY) benchmarks/bench_networks.py
	$(PY) benchmarks/bench_sid_iteration.py
	$(PY) benchmarks/bench_preset_memory.py

clean-venv:
	rm -rf $(VENV)
