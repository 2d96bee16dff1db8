# interleaf: `make demo` trains a tiny model on the built-in shapes world and generates with it;
# `make test` runs the test suite. Both set up .venv first (CPU torch pinned before anything
# that depends on it, so no multi-GB CUDA build is pulled in).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  ?= torch==2.13.0
# xformers has no CPU kernels; the tests run its glue around xformers' own reference attention.
# Installed without its dependencies, so its torch requirement can never replace the pinned build.
XFORMERS ?= xformers==0.0.35
# taming-transformers: the original VQ-GAN code (Chameleon's image tokenizer comes from it), the tests'
# reference for our encoder and decoder. Without its dependencies (Lightning, torchvision): the tests
# import only its torch-only modules.
TAMING ?= taming-transformers==0.0.1

.PHONY: setup browser demo test lint format bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps $(XFORMERS)
	$(PIP) install -q --no-deps $(TAMING)
	touch $@

demo: setup
	$(VENV)/bin/interleaf demo

test: setup browser
	$(PY) -m pytest -q

# ruff: the formatter's output and the linter's rules (pyproject.toml), checked, nothing rewritten
lint: setup
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# The viewer's end-to-end test drives Debian's chromium; install it where we can (root + apt),
# and carry on without it elsewhere (that test then skips, saying why).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    timeout 600 sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver' >/dev/null 2>&1; } || \
	  echo "browser: chromium not installed; the browser test will be skipped"

bench: setup
	$(PY) bench/train_step.py
	$(PY) bench/decode.py
	$(PY) bench/loader.py

clean:
	rm -rf $(VENV) runs .pytest_cache
