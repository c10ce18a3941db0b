# Two commands on a fresh machine: `make serve` and `make test`. Both create .venv and install what is needed.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SHARED_MODELS := ../shared/models
MODELS_DIR := models
HOST ?= 127.0.0.1
PORT ?= 8000
ifneq ($(wildcard $(SHARED_MODELS)/prepare.py),)
MODEL ?= $(MODELS_DIR)/SmolLM2-135M-Instruct
else
MODEL ?= HuggingFaceTB/SmolLM2-135M-Instruct
endif

.PHONY: venv models browser serve test lint format bench bench-quant clean

venv: $(BIN)/.installed

# torch first, pinned, so pip takes the CPU wheel on disk instead of resolving a CUDA build.
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# The shared models become Hugging Face directories inside the checkout (git-ignored).
models: venv
ifneq ($(wildcard $(SHARED_MODELS)/prepare.py),)
	$(BIN)/python $(SHARED_MODELS)/prepare.py $(MODELS_DIR)
endif

serve: models
	$(BIN)/shoal serve --model $(MODEL) --host $(HOST) --port $(PORT)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The console's browser tests (tests/test_console_browser.py) drive Debian's chromium through playwright
# (no browser download): installed here where missing, when root with apt-get, without its recommends (19
# packages instead of 106: 10 s instead of 17); elsewhere they skip.
browser:
	@if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get install -y -qq --no-install-recommends chromium || { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium; }; \
	fi

test: models lint browser
	SHOAL_TEST_MODELS=$(abspath $(MODELS_DIR)) $(BIN)/pytest

bench: models
	$(BIN)/python bench/run_all.py --model $(MODEL)

# Issue 18's quantization benchmark (full protocol; ARGS="--num-tokens 4096 --num-samples 16 --seq-len 256" for a quick run)
bench-quant: models
	$(BIN)/python bench/quant.py --model $(MODEL) $(ARGS)

clean:
	rm -rf $(VENV) $(MODELS_DIR)
