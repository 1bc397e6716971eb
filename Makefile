# Two commands: `make demo` and `make test`. Both set everything up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
MKDOCS := NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs
# The CPU wheel of torch that lies on this machine's disk; installed first so that nothing pulls
# an unpinned (multi-GB CUDA) torch.
TORCH  ?= torch==2.13.0

.PHONY: setup demo test test-fast docs bench proto clean

# pip's and setuptools' chatter goes to $(VENV)/install.log; it is shown only if the install fails.
$(VENV)/.installed: pyproject.toml
	@echo "setting up $(VENV) (log: $(VENV)/install.log)"
	@$(PYTHON) -m venv $(VENV)
	@( $(PIP) install -q --upgrade pip && $(PIP) install -q "$(TORCH)" && \
	   $(PIP) install -q -e ".[dev,docs,examples,archaeology,cluster,logging,ray]" ) > $(VENV)/install.log 2>&1 \
	   || { cat $(VENV)/install.log; echo "install failed (log: $(VENV)/install.log)"; exit 1; }
	@touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) examples/digits_cnn.py

# Two test processes (pytest-xdist), a file each at a time: most tests wait on processes and sockets.
test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile
	$(MKDOCS) build --strict --site-dir site

test-fast: setup
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not slow"

# The documentation site (docs/, mkdocs.yml) on http://127.0.0.1:8000; `make test` builds it with --strict.
docs: setup
	$(MKDOCS) serve

bench: setup
	$(PY) benchmarks/throughput.py
	$(PY) benchmarks/memory.py
	$(PY) benchmarks/elastic.py
	$(PY) benchmarks/control_plane.py
	$(PY) benchmarks/fused.py

clean:
	rm -rf $(VENV) build site *.egg-info .pytest_cache
