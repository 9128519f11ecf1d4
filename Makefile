# The two commands of the contract: `make demo` (prompt in, image out) and `make test` (every
# test). Both set themselves up on a fresh machine: the Python venv with the PyPI torch wheel
# that carries libtorch (tch 0.24 pairs with torch 2.11.0), the reference packages the tests
# use, and buf for the proto lint. Set-up is idempotent and takes seconds once done.

SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV     := .venv
PY       := $(VENV)/bin/python
REQS     := tests/python/requirements.txt
STAMP    := $(VENV)/.installed
BUF_VER  := 1.75.0
BUF      := .cache/buf/node_modules/.bin/buf

PROMPT    ?= a red circle on a blue background
SEED      ?= 42
STEPS     ?= 20
DEMO_OUT  ?= out/demo.png
DEMO_MODEL ?= services/training/default-model

.PHONY: help setup demo default-model test build lint fmt buf-lint clean images k8s-check gpu-bundle

help:
	@echo "make demo   PROMPT=\"...\"   generate $(DEMO_OUT) from a prompt (all four services, in one process)"
	@echo "make test                   run every test (unit, parity, end-to-end, proto lint)"
	@echo "make setup                  only install the Python venv with libtorch (done by both)"
	@echo "make default-model          retrain the shipped default model from scratch, then score it"
	@echo "make images                 build the four container images (needs a container engine)"
	@echo "make k8s-check              render and validate the Kubernetes manifests (part of make test)"
	@echo "make gpu-bundle             fill .gpu/ for tests/python/gpu_bench.sh on a GPU machine"

## Set-up ---------------------------------------------------------------------------------
setup: $(STAMP)

# The stamp depends on the requirements, so changing a pin reinstalls. `.venv/libtorch` links
# to the wheel's torch/ folder; .cargo/config.toml points LIBTORCH at it.
$(STAMP): $(REQS)
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --no-cache-dir -r $(REQS)
	ln -sfn "$$($(PY) -c 'import os, torch; print(os.path.dirname(torch.__file__))')" $(VENV)/libtorch
	@touch $@

$(BUF):
	npm install --silent --no-audit --no-fund --prefix .cache/buf @bufbuild/buf@$(BUF_VER)

## Main job -------------------------------------------------------------------------------
# The default model is the project's own: a small latent diffusion model trained from scratch
# on the synthetic shapes dataset (services/training/default-model, see its MODEL_CARD.md).
# Point DEMO_MODEL at another diffusers folder (e.g. stable-diffusion-v1-5) to use it instead.
demo: setup
	cargo run --quiet -p sd-cli --bin sd -- generate --local --model "$(DEMO_MODEL)" \
	  --prompt "$(PROMPT)" --seed $(SEED) --steps $(STEPS) --output "$(DEMO_OUT)"

# Retrains the shipped default model from scratch (see its MODEL_CARD.md for time and scores),
# then scores it on the held-out prompts.
TRAIN_ARGS ?=
default-model: setup .cache/clip-vocab/vocab.json
	cargo run --quiet -p sd-cli --bin sd -- train --out services/training/default-model \
	  --checkpoints target/default-model-checkpoints --tokenizer .cache/clip-vocab $(TRAIN_ARGS)
	cargo run --quiet -p sd-cli --bin sd -- eval --model services/training/default-model

.cache/clip-vocab/vocab.json: | setup
	$(PY) tests/python/clip_vocab.py .cache/clip-vocab

## Tests ----------------------------------------------------------------------------------
build: setup
	cargo build --locked --workspace --bins

test: setup build buf-lint lint k8s-check
	cargo fmt --all -- --check
	cargo test --workspace --no-fail-fast

buf-lint: $(BUF)
	cd proto && ../$(BUF) lint

lint: setup
	cargo clippy --workspace --all-targets -- -D warnings

fmt:
	cargo fmt --all

## Deployment -----------------------------------------------------------------------------
# Offline: every overlay in deploy/k8s renders (kubectl kustomize), validates with
# kubernetes-validate --strict, and keeps the properties tests/python/test_manifests.py asserts.
k8s-check: setup
	$(PY) tests/python/test_manifests.py

# Needs a running container engine (docker buildx with BuildKit); machines with only the
# docker client, like the CI machines, cannot run it. IMAGE_PUSH=--push to push.
IMAGE_REPO ?= sd-grpc
IMAGE_TAG  ?= dev
IMAGE_PUSH ?= --load
images:
	for t in text-encoder denoiser vae orchestrator; do \
	  docker buildx build -f deploy/docker/Dockerfile --target $$t \
	    -t $(IMAGE_REPO)/$$t:$(IMAGE_TAG) $(IMAGE_PUSH) . || exit 1; \
	done

## GPU measurements -----------------------------------------------------------------------
# .gpu/ (git-ignored, under the 64 MiB a GPU call carries): the release binaries, stripped,
# the diffusers wheels that machine lacks (Python 3.12 there), and the shared baseline scripts
# when they are beside the checkout. tests/python/gpu_bench.sh runs there from the repo root.
GPU_WHEELS := diffusers==0.42.1 importlib_metadata zipp
gpu-bundle: setup
	cargo build --locked --release -p sd-cli --bin sd -p sd-denoiser --bin sd-denoiser
	mkdir -p .gpu/bin .gpu/whl .gpu/bench
	for b in sd sd-denoiser; do strip -o .gpu/bin/$$b target/release/$$b; done
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp --platform manylinux2014_x86_64 -d .gpu/whl $(GPU_WHEELS)
	if [ -d ../shared/bench ]; then install -m 644 ../shared/bench/*.py .gpu/bench/; fi
	du -sh .gpu

clean:
	cargo clean
	rm -rf out .cache/models
