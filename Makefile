# Two set-up commands: `make demo` and `make test`. Each creates .venv on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch. A plain `pip install torch` would pull a multi-GB CUDA build;
# override (e.g. TORCH_SPEC='torch==2.5.1') to use another, any >= 2.3 works.
TORCH_SPEC ?= torch==2.13.0
export NO_ALBUMENTATIONS_UPDATE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv demo test test-fast bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, and only if missing: deepspeed builds against the torch already there.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	# The constraint keeps whichever torch is installed from being replaced.
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-constraint.txt
	$(PY) -m pip install -q -c $(VENV)/torch-constraint.txt -e '.[test]'
	# The bench extra without its dependencies: open_clip_torch's torchvision would replace torch.
	$(PY) -m pip install -q -c $(VENV)/torch-constraint.txt --no-deps 'open_clip_torch>=3.0'
	touch $@

demo: venv
	$(PY) -m vutrain.demo

test: venv
	$(PY) -m pytest -q tests

bench: venv
	$(PY) -m vutrain.bench

clean:
	rm -rf $(VENV) runs demo_out .pytest_cache
