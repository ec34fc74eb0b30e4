# Every target sets itself up: the first run creates .venv and installs what it needs.
PYTHON      ?= python3
VENV        := .venv
PY          := $(VENV)/bin/python
TORCH_SPEC  ?= torch==2.13.0
CONFIG      ?= configs/tiny.yaml
NPROC       ?= 2
ARGS        ?=
STAMP       := $(VENV)/.installed

.PHONY: venv pretrain test data clean-venv

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

test: $(STAMP)
	$(PY) -m pytest -q tests $(ARGS)

clean-venv:
	rm -rf $(VENV)
