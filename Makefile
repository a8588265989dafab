# Two commands on a fresh machine: `make demo` and `make test`. Each sets itself up.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The stamp changes whenever pyproject.toml does, so a new dependency re-runs pip.
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: demo test lint venv browser clean toy-model toy-data

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@rm -f $(VENV)/.installed-*
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

# Headless Chromium for the report checks (Debian package; never a browser download).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian chromium for the report browser tests"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || echo "WARNING: chromium could not be installed; browser tests will be SKIPPED"; }

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports --no-cache

test: $(STAMP) browser lint
	$(PY) -m pytest -q -p no:cacheprovider --durations=15

demo: $(STAMP)
	$(VENV)/bin/castbook validate specs/examples/luca.yaml
	$(VENV)/bin/castbook plan specs/examples/luca.yaml
	$(VENV)/bin/castbook render specs/examples/luca.yaml --out runs
	@run=$$(ls -td runs/*/ | head -1); \
	  echo; echo "== what the pixels show, per job (castbook toyworld eval $$run --by-job)"; \
	  $(VENV)/bin/castbook toyworld eval $$run --by-job --errors 0; \
	  echo; echo "== the consistency gate (castbook check $$run)"; \
	  $(VENV)/bin/castbook check $$run; \
	  echo; echo "open $${run}report.html"

# The toy-world training sets of the example character (generated, deterministic, not committed).
toy-data: $(STAMP)
	$(VENV)/bin/castbook toyworld generate --out data/toy/luca --count 32 --seed 0 --character luca
	$(VENV)/bin/castbook toyworld generate --out data/toy/world --count 512 --seed 7

# Retrain the toy-world models from the committed recipes (about 2.5 h on a 2-core CPU; see
# benchmarks/RESULTS.md): toy CLIP, base model, ControlNet, then the luca LoRA on that base.
toy-model: toy-data
	$(VENV)/bin/castbook toymodel train-clip specs/toy/toy-clip.yaml
	$(VENV)/bin/castbook toymodel train-base specs/toy/toy-base.yaml
	$(VENV)/bin/castbook toymodel train-controlnet specs/toy/toy-controlnet.yaml
	$(VENV)/bin/castbook train specs/training/luca.yaml

clean:
	rm -rf runs .pytest_cache
