# The kit in two commands: `make figures` and `make test`. `make lab` opens the notebooks.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SCALE ?= quick
ONLY ?=
JOBS ?= auto
PYTEST_ARGS ?=
STAMP := $(VENV)/.installed-stamp

.PHONY: setup figures book test lab chromium fashion-mnist bench clean-figures help

help:
	@echo "make figures [SCALE=quick|medium|paper] [ONLY=<id or prefix>] [JOBS=auto|N]  regenerate the figures"
	@echo "make book [SCALE=quick|paper]                           the executed notebooks as a static site in build/book/"
	@echo "make test                                               run every test, notebooks included"
	@echo "make lab                                                open JupyterLab on notebooks/"
	@echo "make bench                                              run the benchmarks"

# Set-up is idempotent: the venv and the install are redone only when pyproject.toml changes.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

setup: $(STAMP) chromium fashion-mnist

# Static PNG export needs a Chromium; HTML export never does.
chromium:
	@bash tools/ensure_chromium.sh

# Fashion-MNIST offline: Debian's dataset-fashion-mnist (or one line saying where to put the files).
fashion-mnist:
	@bash tools/ensure_fashion_mnist.sh

figures: setup
	$(BIN)/python -m nc_lib.figures --scale $(SCALE) --only "$(ONLY)" --jobs $(JOBS)

# The course as a static site in build/book/, from the notebooks `make figures` executed (nothing is re-run).
BOOK_STAMP := $(VENV)/.book-stamp
$(BOOK_STAMP): $(STAMP) pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[book]'
	@touch $(BOOK_STAMP)

book: $(BOOK_STAMP)
	$(BIN)/python -m nc_lib.book --scale $(SCALE)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lab: setup
	$(BIN)/python -m ipykernel install --user --name nc-kit --display-name "Neural collapse kit (.venv)"
	$(BIN)/jupyter lab notebooks/

bench: setup
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean-figures:
	rm -rf figures/*.html figures/*.png figures/*.csv figures/*.js figures/manifest.json figures/index.html figures/README.md build/notebooks
