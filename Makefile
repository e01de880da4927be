# Two set-up commands: `make demo` and `make test`. Each creates .venv on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch. A plain `pip install torch` would pull a multi-GB CUDA build;
# override (e.g. TORCH_SPEC='torch==2.12.0') to use another: >= 2.6 with constraints.txt (its
# accelerate needs 2.6), any >= 2.3 with CONSTRAINTS= (the newest versions setup.py allows).
TORCH_SPEC ?= torch==2.13.0
# A torch already in .venv is kept (e.g. a CUDA build you installed), but a TORCH_SPEC you give (command
# line or environment) that differs from the one `make venv` last installed replaces it: without this
# record a later `make test TORCH_SPEC=...` was silently ignored.
TORCH_SPEC_FILE := $(VENV)/torch-spec.txt
ifneq ($(filter command line environment,$(origin TORCH_SPEC)),)
ifneq ($(strip $(TORCH_SPEC)),$(strip $(shell cat $(TORCH_SPEC_FILE) 2>/dev/null)))
TORCH_REINSTALL := 1
endif
endif
# The tested versions of everything else (constraints.txt, refreshed by `make lock`). Pass
# `CONSTRAINTS=` to resolve the newest versions setup.py allows instead.
CONSTRAINTS ?= constraints.txt
# The installed torch may pin packages of its own (a CUDA build: its triton; an older one: its sympy):
# those pins of $(CONSTRAINTS) give way to it (tools/lock_versions.py --for-installed-torch).
PIN := $(if $(CONSTRAINTS),-c $(VENV)/constraints.txt)
export NO_ALBUMENTATIONS_UPDATE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: FORCE venv demo test test-fast lint learn-check install-check bench lock clean
FORCE:

venv: $(VENV)/.installed

# tools/lock_versions.py too: a fix to its filter of the pins reaches an existing .venv.
$(VENV)/.installed: setup.py $(CONSTRAINTS) tools/lock_versions.py $(if $(TORCH_REINSTALL),FORCE)
	# The mark of a complete install goes first and comes back last (touch): a rebuild stopped half
	# way (pip killed, Ctrl-C, a failed download) left the old mark, and the next `make` with the same
	# TORCH_SPEC took the half-installed .venv for complete and went on to run in it.
	@rm -f $@
	# A venv left without pip (its creation failed half way, e.g. python3-venv missing) is rebuilt,
	# so that the real error shows again instead of "No module named pip" on every later run.
	@test ! -x $(PY) || $(PY) -m pip --version > /dev/null 2>&1 || { echo "$(VENV) has no pip: rebuilding it"; rm -rf $(VENV); }
	# No $(PYTHON) on PATH: say what to do, not the shell's bare "python3: not found".
	@test -x $(PY) || command -v $(PYTHON) > /dev/null || { echo "error: $(PYTHON) not found on PATH: install Python >= 3.11, or make PYTHON=/path/to/python3.11 ..." >&2; exit 1; }
	# A python3 older than 3.11 (what the pinned packages need) stops here, not in pip's resolver.
	@test -x $(PY) || $(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "error: $(PYTHON) is Python %d.%d; vutrain needs >= 3.11 (make PYTHON=python3.11 ...)" % sys.version_info[:2])'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first (deepspeed builds against the torch already there): if missing, or asked for (above).
	$(PY) -c "import torch" 2>/dev/null && test -z "$(TORCH_REINSTALL)" || \
	    { $(PY) -m pip install -q "$(TORCH_SPEC)" && echo '$(TORCH_SPEC)' > $(TORCH_SPEC_FILE); }
	# The constraint keeps whichever torch is installed from being replaced.
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-constraint.txt
	$(if $(CONSTRAINTS),$(PY) tools/lock_versions.py --for-installed-torch $(CONSTRAINTS) --out $(VENV)/constraints.txt)
	$(PY) -m pip install -q -c $(VENV)/torch-constraint.txt $(PIN) -e '.[test]'
	# The bench extra without its dependencies: open_clip_torch's torchvision would replace torch.
	$(PY) -m pip install -q -c $(VENV)/torch-constraint.txt $(PIN) --no-deps 'open_clip_torch>=3.0'
	touch $@

demo: venv
	$(PY) -m vutrain.demo

# Two pytest workers (pytest-xdist): the suite is mostly launcher, rank and SLURM start-up, which
# left the 2-core CI machine 42% idle with one worker (1478 s); with two it took 1000 s. The SLURM
# tests stay on one worker (tests/conftest.py). More workers on a bigger machine: TEST_WORKERS=N.
TEST_WORKERS ?= 2

test: venv
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --durations=25 tests  # the slowest 25 close the log

# Every test that stays in this process (no subprocess, launcher, spawned ranks or SLURM; which
# tests are slow is decided in tests/conftest.py): under 2 minutes on 2 idle cores.
test-fast: venv
	$(PY) -m pytest -q -m "not slow and not slurm and not gpu" --durations=5 tests

# ruff (pinned in setup.py's test extra, configured in pyproject.toml): lint, then formatting.
lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# The model learns: the demo's recipe must beat chance (1/24 = 0.042) by a wide margin. Measured with
# 300 steps: 0.729 on a 2-core CPU (BENCHMARKS.md; 0.435 at step 100, 0.663 at step 200) and
# 0.49-0.51 on one GPU (bf16, 1 rank); 150 steps reached 0.540 on the CPU. So 0.3 (7x chance) fails
# only when training has stopped learning.
LEARN_STEPS ?= 300
LEARN_MIN_TOP1 ?= 0.3
learn-check: venv
	$(PY) -m vutrain.demo --out demo_out/learn_check --steps $(LEARN_STEPS) --min-top1 $(LEARN_MIN_TOP1)

# `pip install .` with no extras, in a fresh venv, runs every entry point (tools/check_core_install.sh).
install-check:
	PYTHON=$(PYTHON) TORCH_SPEC='$(TORCH_SPEC)' CONSTRAINTS='$(CONSTRAINTS)' bash tools/check_core_install.sh

# Rewrite constraints.txt with what pip resolves today; then `make test` and commit it.
lock: venv
	$(PY) tools/lock_versions.py

bench: venv
	$(PY) -m vutrain.bench

clean:
	rm -rf $(VENV) runs demo_out .pytest_cache
