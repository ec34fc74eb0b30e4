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

.PHONY: venv pretrain finetune test plan plan-demo clean-venv

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
# TEST_WORKERS=0 runs it in one process.
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=20 tests $(ARGS)

clean-venv:
	rm -rf $(VENV)
