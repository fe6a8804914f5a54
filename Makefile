# twin-dpo: the front door. `make help` lists the targets.
#
# Every target that runs Python depends on `setup`, which creates .venv once:
# torch first (pip takes the CPU build from local disk here; any other order
# downloads GBs of CUDA), then this package under the tested version set.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
# GPU=1 installs the GPU set (CUDA torch from PyPI, unsloth, xformers; constraints/gpu.txt); GPU=0 the CPU set.
# Default: 1 when nvidia-smi runs and sees a GPU.
GPU ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1 || echo 0)
ifeq ($(GPU),1)
CONSTRAINTS := constraints/gpu.txt
EXTRAS := dev,gpu,track
else
CONSTRAINTS := constraints/cpu.txt
EXTRAS := dev,track
endif
STAMP := $(VENV)/.twin-dpo-setup-gpu$(GPU)
GGUF_STAMP := $(VENV)/.twin-dpo-gguf
TORCH := torch==2.13.0
# pip shows errors only: at one --quiet it still prints a warning per package for every unreadable index or
# find-links location in the machine's own pip configuration (not ours to fix, and not the user's news).
PIPQ := --quiet --quiet --disable-pip-version-check
RUN ?=
SET ?=
STEPS ?=
SETS := $(foreach s,$(SET),--set $(s))

.DEFAULT_GOAL := help
.PHONY: help setup setup-gguf dpo-lora dpo-qlora dpo-full sft dpo-lora-twin twin evaluate compare sweep bench gpu-smoke export test test-slow clean

help: ## list the targets
	@echo "twin-dpo — DPO for a twin language model, on CPU or one GPU"
	@echo
	@grep -E '^[a-z][a-z-]*:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | awk -F'\t' '{printf "  make %-12s %s\n", $$1, $$2}'
	@echo
	@echo "Options: SET='train.beta=0.1 train.learning_rate=5e-6' (recipe overrides), STEPS=N (stop after N steps),"
	@echo "         GPU=0|1 (force the CPU or GPU version set; default: GPU when nvidia-smi sees one), RUN=runs/... (export),"
	@echo "         NPROC=N (train on N processes through accelerate: DDP; configs/accelerate/ for FSDP, DeepSpeed, nodes)"

setup: $(STAMP) ## create .venv with the tested versions (once; later runs reuse it)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "[twin-dpo] setting up .venv with the $(if $(filter 1,$(GPU)),GPU,CPU) version set ($(CONSTRAINTS))"
	$(PY) -m pip install $(PIPQ) $(TORCH)
	@if [ "$(GPU)" = 1 ]; then $(PY) -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" \
	  || $(PY) -m pip install $(PIPQ) --force-reinstall --no-deps $(TORCH); fi
	$(PY) -m pip install $(PIPQ) -c $(CONSTRAINTS) -e '.[$(EXTRAS)]'
	$(PY) -m pipeline embedded-model
	@rm -f $(VENV)/.twin-dpo-setup-gpu*
	@touch $@
	@echo "[twin-dpo] .venv is ready"

setup-gguf: $(GGUF_STAMP) ## add llama.cpp for GGUF export: its converters, quantizer and runtime (builds once per machine: ~5-7 min on 2 cores)

# llama.cpp comes from one source: the llama-cpp-python sdist pinned by hash in constraints/llama-cpp-sdist.txt,
# downloaded once per machine into LLAMA_SDIST_DIR. From it, llama.cpp is built once per machine into LLAMA_WHEELS,
# and its own GGUF converters are extracted into .cache/llama.cpp-converters-<version>/. The build is portable
# (AVX2, not -march=native): a native build on a CPU with AMX segfaulted in llama.cpp's Q8_0 path on the test
# models, and pip's own wheel cache would hand a native build to the next, different machine.
LLAMA_VERSION := 0.3.36
LLAMA_SDIST_DIR ?= $(HOME)/.cache/twin-dpo/sdist
LLAMA_WHEELS ?= $(HOME)/.cache/twin-dpo/wheels/llama-cpp-python-$(LLAMA_VERSION)-avx2
LLAMA_CMAKE_ARGS := -DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON

$(GGUF_STAMP): $(STAMP) constraints/llama-cpp-sdist.txt
	TWIN_DPO_SDIST_DIR=$(LLAMA_SDIST_DIR) $(PY) -m pipeline llama-cpp-source --sdist-only
	@if ! ls $(LLAMA_WHEELS)/*.whl >/dev/null 2>&1; then \
	  echo "[twin-dpo] building llama-cpp-python once for this machine (portable AVX2 build, about 5-7 minutes on 2 cores)"; \
	  rm -rf $(LLAMA_WHEELS).tmp && mkdir -p $(LLAMA_WHEELS).tmp && \
	  CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip wheel $(PIPQ) --no-cache-dir --no-deps \
	    -w $(LLAMA_WHEELS).tmp $(LLAMA_SDIST_DIR)/llama_cpp_python-$(LLAMA_VERSION).tar.gz && \
	  mv $(LLAMA_WHEELS).tmp $(LLAMA_WHEELS); fi
	$(PY) -m pip install $(PIPQ) --force-reinstall --no-deps $(LLAMA_WHEELS)/*.whl
	$(PY) -m pip install $(PIPQ) -c $(CONSTRAINTS) -e '.[gguf]'
	TWIN_DPO_SDIST_DIR=$(LLAMA_SDIST_DIR) $(PY) -m pipeline llama-cpp-source
	@touch $@

STEPFLAG := $(if $(STEPS),--max-steps $(STEPS),)
NPROC ?=
NPROCFLAG := $(if $(NPROC),--nproc $(NPROC),)

dpo-lora: setup ## LoRA DPO on the embedded twin (reference = the twin, adapter off); the first run builds the twin (~5 min)
	$(PY) -m pipeline train dpo_lora $(STEPFLAG) $(NPROCFLAG) $(SETS)

dpo-qlora: setup ## the same with the base in 4-bit NF4
	$(PY) -m pipeline train dpo_qlora $(STEPFLAG) $(NPROCFLAG) $(SETS)

dpo-full: setup ## full DPO with a separate frozen reference (the baseline)
	$(PY) -m pipeline train dpo_full $(STEPFLAG) $(NPROCFLAG) $(SETS)

sft: setup ## the twin as an adapter: LoRA SFT on the author's answers (recipes/sft_twin.py), for dpo-lora-twin
	$(PY) -m pipeline sft sft_twin $(STEPFLAG) $(SETS)

dpo-lora-twin: setup ## LoRA DPO on the newest twin adapter (make sft first); frozen copy as reference
	$(PY) -m pipeline train dpo_lora_twin $(STEPFLAG) $(NPROCFLAG) $(SETS)

twin: setup-gguf ## sft -> DPO on the twin adapter -> export -> memory check; summary in reports/twin/ (~15 min)
	$(PY) -m pipeline twin $(if $(STEPS),--steps $(STEPS),) $(SETS)

evaluate: setup ## answer the fixed questions with the newest run (or RUN=...) and the untouched twin
	$(PY) -m pipeline evaluate $(RUN)

compare: setup ## LoRA vs QLoRA vs full DPO vs plain TRL -> reports/compare/ (~35 min; STEPS=N for a quick one)
	$(PY) -m pipeline compare $(if $(STEPS),--steps $(STEPS),) $(SETS)

GRID ?=
sweep: setup ## light LoRA DPO runs (default grid: 3 lr x 2 beta) ranked by held-out accuracy and voice -> reports/sweep/ (GRID='k=v1,v2 ...')
	$(PY) -m pipeline sweep dpo_lora $(foreach g,$(GRID),--grid $(g)) $(if $(STEPS),--steps $(STEPS),) $(SETS)

REPEATS ?=
bench: setup ## our LoRA DPO vs plain TRL: pairs/s ratio, ablation, scaling -> reports/bench/ (~130 min on 2 cores; STEPS=, REPEATS=)
	$(PY) -m pipeline bench $(if $(STEPS),--steps $(STEPS),) $(if $(REPEATS),--repeats $(REPEATS),) $(SETS)

gpu-smoke: setup ## on a CUDA GPU: dpo-lora and dpo-qlora, unsloth vs hf backend, 30 steps each, one table
	$(PY) -m pipeline gpu-smoke $(if $(STEPS),--steps $(STEPS),) $(SETS)

export: setup-gguf ## export the newest run (or RUN=runs/...): adapter, merged, GGUF, Modelfile, with proofs
	$(PY) -m pipeline export $(RUN) $(SETS)

test: setup ## lint + the fast test suite on tiny models (~8 min here; the GGUF proofs, once `make setup-gguf` is done, add ~17)
	$(BIN)/ruff check --quiet pipeline recipes tests benchmarks
	$(PY) -m pytest -q

test-slow: setup-gguf ## end-to-end tests on the embedded SmolLM2-135M, with llama.cpp (builds it once)
	$(PY) -m pytest -q -m slow

clean: ## remove run folders and caches (keeps .venv)
	rm -rf runs reports .cache .pytest_cache
