#!/usr/bin/env bash
# A core install runs: `pip install .` with no extras, in a fresh virtual environment, then a tiny
# smoke of every entry point, run from a directory outside the repository (so the installed
# package, and the run files shipped inside it, are what is tested). `.ci/run` calls this.
#
#   tools/check_core_install.sh [WORK_DIR]  # PYTHON=python3 TORCH_SPEC=torch==2.13.0 CONSTRAINTS=constraints.txt
#   tools/check_core_install.sh --no-extras PYTHON  # only the check that PYTHON has no extra installed
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)

# The extras' packages must really be absent, or the smoke below proves nothing. Every extra is named
# (bench: open_clip and its torchvision, which would bring another torch; kernels: triton, unless the
# installed torch itself requires it, as a CUDA build does).
check_no_extras() {
    "$1" - <<'PY'
import importlib.metadata
import importlib.util
import re
import sys

extras = ["pandas", "pyarrow", "img2dataset", "imagehash", "pytest", "open_clip", "torchvision", "tensorboard"]
torch_needs = {re.split(r"[^A-Za-z0-9_.-]", r, maxsplit=1)[0].lower() for r in importlib.metadata.requires("torch") or []}
extras += [] if "triton" in torch_needs else ["triton"]
present = [m for m in extras if importlib.util.find_spec(m)]
if present:
    sys.exit(f"FAIL: not a core install: {', '.join(present)} installed")
import simplejpeg  # (the training workers' JPEG decoder is a core requirement)
PY
}
usage() {
    echo "usage: tools/check_core_install.sh [WORK_DIR] | --no-extras PYTHON ($1)" >&2
    exit 2
}
if [ "${1:-}" = --no-extras ]; then
    [ $# = 2 ] || usage "--no-extras takes one PYTHON"
    check_no_extras "$2"
    echo "core-install: no extra installed in $2"
    exit 0
fi
[ $# -le 1 ] || usage "one WORK_DIR at most, got $# arguments"
case "${1:-}" in -*) usage "unknown option $1" ;; esac
if [ $# = 1 ]; then
    WORK=$1
else
    # A temporary directory of our own goes once the check passes: it holds a whole venv with torch
    # (1.4 GB), and every `make install-check` left one behind in /tmp. A failed check keeps it.
    WORK=$(mktemp -d -t vutrain-core-XXXXXX)
    trap 'if [ $? = 0 ]; then rm -rf "$WORK"; else echo "core-install: kept $WORK for a look; rm -rf it after" >&2; fi' EXIT
fi
PYTHON=${PYTHON:-python3}
# The check runs inside WORK: a WORK_DIR or PYTHON path given relative to the caller's directory is
# made absolute first (`check_core_install.sh work` stopped with "work/venv/bin/python: No such file").
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
case "$PYTHON" in
    /*) ;;
    */*) PYTHON=$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON") ;;
esac
# The CPU build of torch first (as the Makefile does), then the package held to that torch.
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
export NO_ALBUMENTATIONS_UPDATE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1 PYTHONPATH=
start=$SECONDS
step() { echo "[core-install $((SECONDS - start))s] $*"; }
# pip's output less its notes about configured index locations that do not exist on this machine.
pip_install() { "$BIN/python" -m pip install -q "$@" 2>&1 | { grep -v "is ignored: it is neither" || true; }; }

cd "$WORK"
# Every output of an earlier check in a WORK_DIR given again goes too, not just its venv: its `run`
# had finished at step 2, so the new check's training resumed it and trained nothing ("the run
# finished at step 2 already"), and its exports and demo_out stood in for the new ones.
rm -rf venv torch-constraint.txt constraints.txt data run run_script hf_model hf_model_script bench.json \
    demo_out shards err.txt
step "fresh venv in $WORK/venv"
"$PYTHON" -m venv venv
BIN=$WORK/venv/bin
pip_install "$TORCH_SPEC"
"$BIN/python" -c "import torch; print('torch==' + torch.__version__)" > torch-constraint.txt
step "pip install $REPO (no extras)"
# The tested versions (constraints.txt), as `make venv` installs them; CONSTRAINTS= for the newest.
CONSTRAINTS=${CONSTRAINTS-constraints.txt}
PIN=()
case "$CONSTRAINTS" in
    "") ;;
    /*) PIN=(-c "$CONSTRAINTS") ;;
    *) PIN=(-c "$REPO/$CONSTRAINTS") ;;
esac
if [ -n "$CONSTRAINTS" ]; then  # less the pins the installed torch rejects, as `make venv` does
    "$BIN/python" "$REPO/tools/lock_versions.py" --for-installed-torch "${PIN[1]}" --out constraints.txt
    PIN=(-c "$WORK/constraints.txt")
fi
pip_install -c torch-constraint.txt "${PIN[@]}" "$REPO"
check_no_extras "$BIN/python"

step "python -m vutrain.data.synthetic"
"$BIN/python" -m vutrain.data.synthetic --out data --num-samples 64 --shard-size 32 --val-samples 24
TRAIN=(data.train_shards="$WORK/data/train/{00000..00001}.tar" data.val_shards="$WORK/data/val/00000.tar"
       train.max_steps=2 train.micro_batch_size=16 train.warmup_steps=1 train.checkpoint_every=0
       train.progress_bar=false eval.every=0 eval.batch_size=24 model.vocab_size=300 data.shuffle_buffer=32)
step "vutrain-train --config tiny (the run file shipped in the package, found by name)"
"$BIN/vutrain-train" --config tiny output_dir=run "${TRAIN[@]}"
step "python vutrain/train.py (the repository's script on the core install)"
"$BIN/python" "$REPO/vutrain/train.py" --config tiny output_dir=run_script "${TRAIN[@]}"
step "vutrain-export and python -m vutrain.export"
"$BIN/vutrain-export" run hf_model
"$BIN/python" -m vutrain.export run_script hf_model_script
"$BIN/python" -c "import transformers as t; t.CLIPModel.from_pretrained('hf_model'); print('CLIPModel loads')"
step "python -m vutrain.bench"
"$BIN/python" -m vutrain.bench --batch-sizes 8 --steps 1 --warmup 1 --out bench.json
step "python -m vutrain.demo (tiny: the pipeline runs; the learning bar is checked elsewhere)"
# The default --out: ./demo_out here, not inside the installed package (site-packages).
"$BIN/python" -m vutrain.demo --num-samples 128 --val-samples 24 --shard-size 64 --steps 2 \
    --ranks 1 --min-top1 0 train.micro_batch_size=16 eval.every=0 train.checkpoint_every=0
test -f demo_out/hf_model/config.json || { echo "FAIL: the demo wrote no $WORK/demo_out/hf_model" >&2; exit 1; }
step "vutrain-dataset: commands that need the data extra say so in one line"
set +e
"$BIN/vutrain-dataset" build --input "$REPO/tests/fixtures/dataset_tools/videos.jsonl" --output shards 2> err.txt
code=$?
set -e
cat err.txt
if [ "$code" != 2 ] || [ "$(wc -l < err.txt)" != 1 ] || ! grep -q "pip install 'vutrain\[data\]'" err.txt; then
    echo "FAIL: vutrain-dataset build without the data extra exited $code; want 2 and a one-line hint" >&2
    exit 1
fi
step "OK: the core install runs every entry point"
