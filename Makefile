# ravlt_pl — one venv (.venv), created once and reused.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# torch comes from the machine's local wheels; the pip cap allows nothing newer.
TORCH   := torch==2.14.1 torchvision==0.29.1
# Every other package at the version the suite passed with (pyproject.toml keeps the ranges).
PIN     := -c constraints.txt

.PHONY: all venv lint format test test-slurm gpu-check demo demo-det demo-seg clean-demo

all: venv

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip $(PIN)
	$(BIN)/pip install -q $(TORCH) $(PIN)
	$(BIN)/pip install -q -e '.[dev]' $(PIN)
	touch $(STAMP)

# ruff: the lint rules and the formatter of pyproject.toml ([tool.ruff]); `make format` applies the formatter.
lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: venv
	$(BIN)/python -m pytest -q tests

# Integration tests against a real local Slurm (2 emulated nodes). Install once with
#   apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge
test-slurm: venv
	scripts/slurm/local_cluster.sh start || echo "test-slurm: no local Slurm; the tests will skip"
	$(BIN)/python -m pytest -q -rs -m slurm tests/test_slurm.py; status=$$?; scripts/slurm/local_cluster.sh stop; exit $$status

# One GPU, no network, under 8 minutes: the cuda-marked tests (fast vs reference path in float32 and bf16,
# fused AdamW, channels-last, flash SDPA, torch.compile, a bf16-mixed step of each demo task with EMA), then
# the bf16 benchmark table. Skips with one line where torch sees no CUDA device.
gpu-check: venv
	@if ! $(BIN)/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then \
		echo "gpu-check: skipped, torch sees no CUDA device"; exit 0; fi; \
	$(BIN)/python -m pytest -q -rs -m cuda tests/test_gpu.py && \
	$(BIN)/python -m ravlt_pl benchmark --device cuda --dtype bfloat16 --batch-sizes 64 128 --train-batch-size 64 \
		--models ravlt_s ravlt_s_reference swin_tiny_patch4_window7_224 convnext_tiny --baseline convnext_tiny \
		--rounds 3 --out reports/gpu_check

# Synthetic shapes → train a small RAVLT on CPU → validate → report (JSON, Markdown, PNG).
demo: venv
	$(BIN)/python -m ravlt_pl.demo classification

# The detection and segmentation demos start from the shipped classification backbone
# (ravlt_pl/weights/demo_classifier.pt, the classification demo's, seed 0).
demo-det: venv
	$(BIN)/python -m ravlt_pl.demo detection

demo-seg: venv
	$(BIN)/python -m ravlt_pl.demo segmentation

clean-demo:
	rm -rf data/synthetic outputs/demo_*
