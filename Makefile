# Two commands: `make demo` and `make test`. Both set everything up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# The CPU wheel of torch that lies on this machine's disk; installed first so that nothing pulls
# an unpinned (multi-GB CUDA) torch.
TORCH  ?= torch==2.13.0

.PHONY: setup demo test test-fast bench proto clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[dev,examples,ray]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) examples/digits_cnn.py

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(PY) benchmarks/throughput.py
	$(PY) benchmarks/memory.py
	$(PY) benchmarks/elastic.py
	$(PY) benchmarks/control_plane.py
	$(PY) benchmarks/fused.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
