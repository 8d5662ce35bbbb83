# Two commands on a fresh machine: `make serve` and `make test`. Each creates the venv and
# installs what it needs first.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Where the model comes from when the store has none: empty = openai/clip-vit-base-patch32 from
# the Hugging Face hub; `--tiny`, `--random-vit-b32`, `--from-dir DIR` or `--hub-id ID` otherwise.
IMPORT_ARGS ?=
# The browser tests/web/test_ui.py drives: Debian's package, not Playwright's own downloads.
CHROMIUM := /usr/bin/chromium
# bentoctl (bentoctl/sagemaker-operator) in its own venv: its pins clash with BentoML 1.4's.
BENTOCTL_VENV ?= .venv-bentoctl
BENTOCTL_STAMP := $(BENTOCTL_VENV)/.installed

.PHONY: serve test lint format import-model build bench screenshot clean bentoctl

# torchvision (nvJPEG on a GPU) only beside a CUDA torch: development and CI run the CPU torch
# wheel (pip's find-links here), beside which PyPI's torchvision, a CUDA build, does not load.
# The bento and its image install requirements.txt as it is.
$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	grep -v '^torchvision==' requirements.txt > $(VENV)/requirements-cpu.txt
	$(BIN)/python -m pip install --quiet -r $(VENV)/requirements-cpu.txt -r requirements-dev.txt
	if $(BIN)/python -c "import sys, torch; sys.exit(torch.version.cuda is None)"; then \
		$(BIN)/python -m pip install --quiet "$$(grep '^torchvision==' requirements.txt)"; fi
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

serve: $(STAMP)
	$(BIN)/python scripts/import_model.py --if-missing $(IMPORT_ARGS)
	$(BIN)/bentoml serve service:ClipService

test: $(STAMP) $(BENTOCTL_STAMP) $(CHROMIUM) lint
	$(BIN)/python -m pytest

$(BENTOCTL_STAMP): requirements-bentoctl.txt
	test -x $(BENTOCTL_VENV)/bin/python || $(PYTHON) -m venv $(BENTOCTL_VENV)
	$(BENTOCTL_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(BENTOCTL_VENV)/bin/python -m pip install --quiet --no-deps -r requirements-bentoctl.txt
	touch $(BENTOCTL_STAMP)

bentoctl: $(BENTOCTL_STAMP)
	@echo "bentoctl: $(BENTOCTL_VENV)/bin/bentoctl (README, 'bentoctl')"

$(CHROMIUM):
	@if [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	else \
		echo "tests/web/test_ui.py needs $(CHROMIUM): run 'sudo apt-get install -y chromium'" >&2; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

import-model: $(STAMP)
	$(BIN)/python scripts/import_model.py $(IMPORT_ARGS)

build: $(STAMP)
	$(BIN)/python scripts/import_model.py --if-missing $(IMPORT_ARGS)
	$(BIN)/bentoml build

bench: $(STAMP)
	$(BIN)/python scripts/bench.py

screenshot: $(STAMP) $(CHROMIUM)
	UI_SCREENSHOT=$(CURDIR)/docs/ui.png $(BIN)/python -m pytest -q tests/web/test_ui.py \
		-k uploaded_image

clean:
	rm -rf $(VENV) $(BENTOCTL_VENV) .pytest_cache .ruff_cache
