# `make demo` runs the embedded default simulation; `make test` runs the test suite.
# Both create .venv on first use. torch==2.13.0 is installed first when the venv has no torch
# (a CPU build here); pyproject keeps `torch>=2.2` open so a GPU user's own build is kept.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==2.13.0"
	$(PY) -m pip install -e ".[test]"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/p2pfl sim --out results/demo

test: $(VENV)/.installed
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) bench/codec.py
	$(PY) bench/sim.py --quick

clean:
	rm -rf $(VENV) results
