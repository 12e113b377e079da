# One virtual environment (.venv) built from pyproject.toml with the pinned constraints.txt.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_WORKDIR ?= runs/demo

.PHONY: setup demo test test-slow clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[data,hf,test]"
	touch $@

setup: $(VENV)/.installed

# The tests add the PyTorch CPU reference (torch-ref: the ports' parity tests; never imported by the
# package itself).
$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q -c constraints.txt -e ".[data,hf,test,torch-ref]"
	touch $@

# The main job: the paper in a box on the built-in dataset (18:24 on 5 Dec, 18:38-21:34 on 6 Dec 2026 on 2 CPU cores, measured: see the README).
demo: setup
	$(VENV)/bin/vqkd demo --workdir $(DEMO_WORKDIR)

# The test suite (slow tests excluded; `make test-slow` runs them), on TEST_WORKERS processes, one
# test file per worker at a time (module fixtures such as the demo run stay in one process).
TEST_WORKERS ?= 2
test: $(VENV)/.installed-test
	$(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile --durations=30 -rs tests

test-slow: $(VENV)/.installed-test
	$(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile -m slow tests

clean:
	rm -rf $(VENV) runs
