# Two commands on a fresh machine:  `make run` (set up, then grow a model)  and  `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup setup-test run test lint bench chromium compiler
setup: $(VENV)/.installed
setup-test: $(VENV)/.installed-test

# The page test drives Debian's chromium through Playwright (which never downloads a browser of its own).
chromium:
	@command -v chromium >/dev/null || (apt-get update -q && apt-get install -y -q chromium)

# llama-cpp-python (the GGUF reader the export tests check against) is compiled from its PyPI source.
compiler:
	@command -v g++ >/dev/null || (apt-get update -q && apt-get install -y -q build-essential)

# torch==2.13.0 first: it is the CPU build on this machine's disk; a bare `torch` would pull a CUDA build.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed | compiler
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PY) -m pip install -q -e '.[test]'
	touch $@

run: setup
	$(VENV)/bin/pocketr1 run

test: setup-test chromium
	OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q

lint: setup-test
	$(VENV)/bin/ruff check pocketr1 tests bench

# The peers (transformers, TRL) come with the `bench` extra.
bench: setup-test
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) bench/engine.py
	$(PY) bench/serve.py
	$(PY) bench/threads.py
	$(PY) bench/pretrain.py
	$(PY) bench/finetune.py
	$(PY) bench/grpo.py
