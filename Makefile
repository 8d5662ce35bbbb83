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
# The Python the project is tested on, and the oldest it takes.
MIN_PYTHON ?= 3.11
# (No f-string: an old Python must be able to say so too.)
PYTHON_IS_NEW_ENOUGH = import sys; need = tuple(map(int, "$(MIN_PYTHON)".split("."))); \
	sys.exit(0 if sys.version_info >= need else "make: %s is Python %s; this project needs \
	$(MIN_PYTHON) or newer: run make with PYTHON=python$(MIN_PYTHON) (or a newer one)" \
	% (sys.executable, sys.version.split()[0]))
# A venv (`$(1)`) is made again unless it has pip and a new enough Python: one that an
# interrupted first run left without pip, or that an older Python made, had been reused by
# every later run, failing the same way whatever PYTHON said.
ENSURE_VENV = $(1)/bin/python -c 'import pip; $(PYTHON_IS_NEW_ENOUGH)' 2>/dev/null || \
	{ $(PYTHON) -c '$(PYTHON_IS_NEW_ENOUGH)' && $(PYTHON) -m venv --clear $(1); }

.PHONY: serve test lint format import-model build bench screenshot clean bentoctl venv

# torchvision (nvJPEG on a GPU) only beside a CUDA torch: development and CI run the CPU torch
# wheel (pip's find-links here), beside which PyPI's torchvision, a CUDA build, does not load.
# The bento and its image install requirements.txt as it is.
$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	@$(call ENSURE_VENV,$(VENV))
	$(BIN)/python -m pip install --quiet --upgrade pip
	grep -v '^torchvision==' requirements.txt > $(VENV)/requirements-cpu.txt
	$(BIN)/python -m pip install --quiet -r $(VENV)/requirements-cpu.txt -r requirements-dev.txt
	if $(BIN)/python -c "import sys, torch; sys.exit(torch.version.cuda is None)"; then \
		$(BIN)/python -m pip install --quiet "$$(grep '^torchvision==' requirements.txt)"; fi
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

# The venv alone, made again if it is broken or too old (what $(STAMP) starts with).
venv:
	@$(call ENSURE_VENV,$(VENV))

serve: $(STAMP)
	$(BIN)/python scripts/import_model.py --if-missing $(IMPORT_ARGS)
	$(BIN)/bentoml serve service:ClipService

test: $(STAMP) $(BENTOCTL_STAMP) $(CHROMIUM) lint
	$(BIN)/python -m pytest

$(BENTOCTL_STAMP): requirements-bentoctl.txt
	@$(call ENSURE_VENV,$(BENTOCTL_VENV))
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
	$(BIN)/python scripts/import_model.py --if-missing --for-bento $(IMPORT_ARGS)
	$(BIN)/bentoml build

bench: $(STAMP)
	$(BIN)/python scripts/bench.py

screenshot: $(STAMP) $(CHROMIUM)
	UI_SCREENSHOT=$(CURDIR)/docs/ui.png $(BIN)/python -m pytest -q tests/web/test_ui.py \
		-k uploaded_image

clean:
	rm -rf $(VENV) $(BENTOCTL_VENV) .pytest_cache .ruff_cache
