# fedsqueeze: `make test` and `make demo` work from a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1

.PHONY: install test demo protos check-protos lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: this build is the CPU wheel; an unpinned torch pulls a CUDA build
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP) check-protos
	$(PY) -m pytest -q

# digits MLP, 20 clients, Dirichlet(0.3): uncompressed vs top-k vs QSGD, then runs/demo/report.
demo: $(STAMP)
	rm -rf runs/demo
	$(VENV)/bin/fedsqueeze demo --out-dir runs/demo

protos: $(STAMP)
	$(PY) -m fedsqueeze.wire.protogen generate

check-protos: $(STAMP)
	$(PY) -m fedsqueeze.wire.protogen check

lint: $(STAMP)
	$(VENV)/bin/ruff check fedsqueeze tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/codec.py

clean:
	rm -rf $(VENV) .pytest_cache
