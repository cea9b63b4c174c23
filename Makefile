# vlkit: the two commands of the README.
#   make repro   install (if needed) and regenerate every table and figure with `dvc repro`
#   make test    install (if needed) and run the tests, the notebooks under nbval included
# The profile (ci|default|paper) is params.yaml's top-level `profile`; `dvc exp run -S profile=ci`
# runs another one without editing the file.
SHELL := /bin/bash
VENV := .venv/bin
# Keep Jupyter/matplotlib state out of the home folder (CI machines stay clean).
export IPYTHONDIR := $(CURDIR)/.cache-jupyter/ipython
export JUPYTER_CONFIG_DIR := $(CURDIR)/.cache-jupyter/config
export JUPYTER_DATA_DIR := $(CURDIR)/.cache-jupyter/data
export MPLCONFIGDIR := $(CURDIR)/.cache-jupyter/mpl
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYTHONHASHSEED := 0

.PHONY: install notebooks test test-unit test-notebooks repro bench lab clean-notebooks

install:
	bash scripts/install.sh

# Notebooks are committed as jupytext py:percent files; the .ipynb are generated.
notebooks: install
	$(VENV)/jupytext --quiet --to ipynb notebooks/[0-9]*.py

test: install notebooks
	$(VENV)/python -m pytest -q tests
	$(VENV)/python -m pytest -q --nbval-lax --nbval-current-env notebooks/[0-9]*.ipynb

test-unit: install
	$(VENV)/python -m pytest -q tests

test-notebooks: install notebooks
	$(VENV)/python -m pytest -q --nbval-lax --nbval-current-env notebooks/[0-9]*.ipynb

repro: install notebooks
	$(VENV)/dvc repro

bench: install
	$(VENV)/python -m bench.run_all

lab: install notebooks
	$(VENV)/jupyter lab --allow-root notebooks
