# diffusiond — the two commands a newcomer needs are `make serve` and `make test`.
# Every target installs what it needs itself and is idempotent.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
TORCH_VERSION := 2.11.0
TORCH_STAMP := $(VENV)/.torch-$(TORCH_VERSION)
CARGO ?= cargo
# Two cores: more parallel rustc jobs only thrash memory.
CARGO_FLAGS ?= --locked

.PHONY: help venv build test fixtures

help:
	@echo "make test      build and run the whole test suite (installs torch into $(VENV) first)"
	@echo "make build     release build of the diffusiond binary"
	@echo "make fixtures  regenerate the diffusers parity fixtures under tests/fixtures"

# The PyPI torch wheel provides libtorch (CPU and CUDA 13) for tch. `.venv/libtorch`
# points at the wheel's package directory; .cargo/config.toml reads it from there.
venv: $(TORCH_STAMP)

$(TORCH_STAMP):
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --disable-pip-version-check --quiet torch==$(TORCH_VERSION)
	ln -sfn "$$(cd $(VENV) && bin/python -c 'import torch, os; print(os.path.relpath(os.path.dirname(torch.__file__)))')" $(VENV)/libtorch
	touch $@

build: venv
	$(CARGO) build $(CARGO_FLAGS) --release

test: venv
	$(CARGO) test $(CARGO_FLAGS)

# Parity fixtures come from Hugging Face diffusers, pinned, in a venv of their own
# that reuses the torch wheel above. The Rust tests read the committed output and
# never need Python.
fixtures: venv
	$(PYTHON) scripts/gen_fixtures.py
