# Every target sets itself up: the first run creates .venv and installs what it needs.
PYTHON      ?= python3
VENV        := .venv
PY          := $(VENV)/bin/python
TORCH_SPEC  ?= torch==2.13.0
CONFIG      ?= configs/tiny.yaml
NPROC       ?= 2
ARGS        ?=
TEST_WORKERS ?= 2
STAMP       := $(VENV)/.installed

.PHONY: venv pretrain finetune test plan plan-demo bench clean-venv

venv: $(STAMP)

$(STAMP): requirements.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

# Pretrain the config on NPROC local ranks (CPU: gloo; GPUs when present).
pretrain: $(STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/deepspeed --num_gpus $(NPROC) launch/pretrain.py --config $(CONFIG) $(ARGS)

# Trace fine-tuning from the tiny pretraining checkpoint (pretrains first if it is missing).
finetune: $(STAMP)
	test -f runs/tiny/checkpoints/latest || $(MAKE) pretrain CONFIG=configs/tiny.yaml
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/deepspeed --num_gpus $(NPROC) launch/finetune_trace.py --config configs/trace_tiny.yaml --init runs/tiny/checkpoints $(ARGS)

# Plan a run from a budget (default: 8 H100s for a week); ARGS="--flops 1e21 --emit-config run.yaml".
plan: $(STAMP)
	$(PY) launch/plan.py $(or $(ARGS),--gpus 8 --gpu H100 --days 7)

# An IsoFLOP sweep on CPU, trained and fitted (~20 minutes on 2 cores).
plan-demo: $(STAMP)
	$(PY) launch/plan.py sweep --preset cpu-demo --out runs/sweep-demo --run --jobs 2

# Two pytest workers, a test file each (module fixtures stay whole): a 2-core machine ran the suite in
# 17 min against 26.5 in one process, whose subprocess tests leave a core idle part of the time.
# TEST_WORKERS=0 runs it in one process. DeepSpeed's CPU Adam is built first, alone (tests/prebuild_ops.py).
test: $(STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) tests/prebuild_ops.py
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=20 tests $(ARGS)

# Benchmarks, never tests (bench/README.md), written to BENCH_OUT. With a GPU: every GPU measurement as one
# time-boxed session (BENCH_BUDGET seconds; jobs in order of importance) and its Markdown report. On CPU: the
# framework's overhead per step against a plain PyTorch loop, and the host's Adam step rate (what an offloaded
# optimizer costs). BENCH_ARGS / BENCH_ADAM_ARGS go to the first / second script.
BENCH_OUT       ?= runs/bench
BENCH_BUDGET    ?= 3600
BENCH_ARGS      ?=
BENCH_ADAM_ARGS ?=
bench: $(STAMP)
	mkdir -p $(BENCH_OUT)
	@if $(PY) -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then \
		set -x; PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) bench/gpu_session.py --budget $(BENCH_BUDGET) --out $(BENCH_OUT)/gpu $(BENCH_ARGS) && \
		$(PY) bench/gpu_report.py $(BENCH_OUT)/gpu --md $(BENCH_OUT)/gpu/report.md; \
	else \
		set -x; PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) bench/train_throughput.py --cpu --json $(BENCH_OUT)/train_throughput_cpu.json $(BENCH_ARGS) && \
		$(PY) bench/cpu_adam.py --json $(BENCH_OUT)/cpu_adam.json $(BENCH_ADAM_ARGS); \
	fi

clean-venv:
	rm -rf $(VENV)
