# Kiln: `make serve` (install, train + export missing default models, serve) and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install serve test test-unit test-integration lint bench gpu-check proto clean help

help:
	@echo "make serve   install, train/export missing default models, start the server (HTTP :3000, gRPC :8001)"
	@echo "make test    install and run the whole test suite"
	@echo "make lint    ruff check"
	@echo "make bench   run benchmarks and update BENCHMARKS.md"
	@echo "make gpu-check  on a CUDA GPU machine: GPU extras, pytest -m gpu, TensorRT benchmark (.ci/gpu-check)"

$(PY):
	$(PYTHON) -m venv $(VENV)

# Re-install only when the dependency list changes.
$(STAMP): pyproject.toml constraints.txt | $(PY)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt -e '.[dev,ray,bench]'  # ray: the distributed gallery backfill and its test; bench: kiln bench vit's peers
	@command -v kubectl >/dev/null || echo "note: kubectl not found; tests/unit/test_k8s.py needs it (apt-get install kubectl or kubernetes-client)"
	touch $(STAMP)

install: $(STAMP)

serve: install
	$(VENV)/bin/kiln serve

test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: install
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

test-integration: install
	$(PY) -m pytest tests/integration $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(VENV)/bin/kiln bench vit
	$(VENV)/bin/kiln bench diffusion
	$(VENV)/bin/kiln bench forecast
	$(VENV)/bin/kiln bench retrieval
	$(VENV)/bin/kiln bench serving

gpu-check:
	.ci/gpu-check

proto: install
	$(PY) -m serving.oip.proto.generate

clean:
	rm -rf $(VENV) .pytest_cache
