#!/bin/bash
# Every GPU check and benchmark of the project in one go, on a GPU host without registry access.
#
#   bash launch/gpu_bench.sh prepare        # development machine: wheels into .whl/, setup.sh into .gpu/
#   bash launch/gpu_bench.sh [STEP ...]     # GPU host, from the checkout's root (default: all steps)
#
# Steps, in order: tests (pytest -m gpu tests/), compare (python -m vutrain.bench --compare
# open_clip), kernels (python -m kernels.bench), data (python -m vutrain.bench data on synthetic
# 256-px shards, 1 and 8 workers). Before any step, .gpu/setup.sh (a copy of shared/gpu/setup.sh)
# installs .whl/ into /tmp/site and prints what imports. Everything goes under $OUT (default
# ./gpu_out): <step>.log, pytest_gpu.xml, compare_open_clip.json/.png, kernels/, data_w*.log, and
# summary.txt (one line per step: name, exit code, seconds). A failing step does not stop the next.
#
# Time: each step has a limit in seconds (TESTS_S=150, COMPARE_S=220, KERNELS_S=60, DATA_S=90),
# and no step starts once TOTAL_S (default 570: one device command may run 600 s) is spent, so
# summary.txt is always written. The compare JSON is rewritten after every configuration: a run
# cut short keeps what it measured. One step alone: e.g. `COMPARE_S=540 ... gpu_bench.sh compare`.
# Extra arguments: COMPARE_ARGS, KERNELS_ARGS (replace the defaults below); COMPARE_EXTRA and
# DATA_EXTRA (appended to the defaults). A dry run on a CPU machine, to check every step's command
# line before GPU time is spent (tiny sizes; the GPU tests skip themselves):
#   GPU_SETUP=/dev/null PYTHON=.venv/bin/python COMPARE_EXTRA="--preset tiny --precision fp32
#   --batch-sizes 4 --steps 1 --warmup 1 --pool 8 --max-batch 8" KERNELS_ARGS=--quick
#   DATA_EXTRA="--batch-size 16 --batches 2 --decode-seconds 0.2 --rounds 1" bash launch/gpu_bench.sh
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if [[ "${1:-}" == "prepare" ]]; then
    set -e
    SHARED="${SHARED:-}"
    for candidate in "$ROOT/../shared" "$ROOT/../../shared" /work/shared; do
        [[ -z "$SHARED" && -f "$candidate/gpu/setup.sh" ]] && SHARED="$candidate"
    done
    [[ -n "$SHARED" ]] || { echo "shared/gpu/setup.sh not found: set SHARED=/path/to/shared" >&2; exit 1; }
    mkdir -p .gpu .whl
    cp "$SHARED/gpu/setup.sh" .gpu/setup.sh
    # The GPU host runs Python 3.12 (see shared/gpu/README.md): binary wheels for it, one of each.
    P="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
    python3 -m pip download -q $P -d .whl hjson pydantic pydantic_core annotated_types typing_inspection \
        typing_extensions "webdataset<0.3" braceexpand "open_clip_torch>=3.0" ftfy wcwidth inf_cl \
        pytest-timeout simplejpeg
    python3 -m pip download -q --no-deps --no-binary=:all: -d .whl deepspeed   # a source archive
    ls .whl
    echo "prepared: carry .whl and .gpu to the GPU host, then run: bash launch/gpu_bench.sh"
    exit 0
fi

OUT="${OUT:-$ROOT/gpu_out}"
mkdir -p "$OUT"
START=$SECONDS
TOTAL_S="${TOTAL_S:-570}"
STEPS=("$@")
[[ ${#STEPS[@]} -gt 0 ]] || STEPS=(tests compare kernels data)

SETUP="${GPU_SETUP:-.gpu/setup.sh}"  # GPU_SETUP: another set-up script (a dry run on a CPU machine)
if [[ ! -r "$SETUP" ]]; then
    echo "$SETUP missing: run 'bash launch/gpu_bench.sh prepare' first" >&2
    exit 1
fi
# shellcheck disable=SC1090
source "$SETUP" > "$OUT/setup.log" 2>&1
echo "setup $? $((SECONDS - START))" > "$OUT/summary.txt"
cat "$OUT/setup.log"
PY="${PYTHON:-python3}"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
# Hugging Face's `kernels` (required by transformers>=5.25) has the import name of our `kernels`
# package, and transformers would import ours in its place; it runs without it (README).
if "$PY" -c "import importlib.metadata as m; m.version('kernels')" 2>/dev/null; then
    "$PY" -m pip uninstall -y -q kernels >> "$OUT/setup.log" 2>&1 || echo "kernels: not uninstalled" >&2
fi

# limit SECONDS: the step's own limit, or less when the total budget is nearly spent
limit() {
    local left=$((TOTAL_S - (SECONDS - START)))
    (( left < $1 )) && echo "$left" || echo "$1"
}

run_step() {  # run_step NAME LIMIT_S COMMAND...
    local name=$1 max; max=$(limit "$2"); shift 2
    if (( max < 20 )); then
        echo "$name skipped 0 (TOTAL_S=$TOTAL_S spent)" >> "$OUT/summary.txt"
        return
    fi
    local t0=$SECONDS
    echo "== $name (limit ${max}s): $*"
    timeout --signal=TERM --kill-after=15 "$max" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 40 "$OUT/$name.log"
    echo "$name $rc $((SECONDS - t0))" >> "$OUT/summary.txt"
}

data_step() {  # runs in its own bash (run_step's timeout): set its options here
    set -o pipefail  # a failing benchmark, not tee, decides the exit code
    local shards dir rc
    dir=$(mktemp -d /tmp/gpu_bench_data.XXXXXX) || return 1
    shards=$("$PY" -c "from vutrain.data.synthetic import write_synthetic as w
info = w('$dir', num_samples=1024, shard_size=128, image_size=256, val_samples=0)
print(info['train_shards'])") || { rm -rf "$dir"; return 1; }
    for workers in 1 8; do
        # shellcheck disable=SC2086  # DATA_EXTRA: more options, split on spaces (a CPU dry run's sizes)
        "$PY" -m vutrain.bench data --shards "$shards" --workers "$workers" --batch-size 256 \
            --image-size 224 ${DATA_EXTRA:-} | tee "$OUT/data_w$workers.log"
        rc=$?
        (( rc == 0 )) || break
    done
    rm -rf "$dir"
    return "$rc"
}

compare_args() {  # the default comparison, its searches ending 75 s before the step's limit
    local max; max=$(limit "${COMPARE_S:-220}")
    args=(--batch-sizes 256,1024 --steps 6 --warmup 2
          --search "open_clip,vutrain z2 torch,vutrain z2 triton ckpt"
          --deadline-min "$(awk "BEGIN { print ($max - 75) / 60 }")")
    [[ -z "${COMPARE_ARGS:-}" ]] || eval "args=($COMPARE_ARGS)"
    [[ -z "${COMPARE_EXTRA:-}" ]] || eval "args+=($COMPARE_EXTRA)"  # appended: later options win
}

DEFAULT_KERNELS_ARGS="--shapes 32768x32768x768,4096x32768x768 --providers eager,inf_cl,ours"
for step in "${STEPS[@]}"; do
    case "$step" in
        tests) run_step tests "${TESTS_S:-150}" "$PY" -m pytest -q -m gpu tests/ -p no:cacheprovider \
                   --junitxml="$OUT/pytest_gpu.xml" ;;
        compare) compare_args
                 run_step compare "${COMPARE_S:-220}" "$PY" -m vutrain.bench --compare open_clip \
                     "${args[@]}" --out "$OUT/compare_open_clip.json" ;;
        kernels) eval "args=(${KERNELS_ARGS:-$DEFAULT_KERNELS_ARGS})"
                 run_step kernels "${KERNELS_S:-60}" "$PY" -m kernels.bench --out "$OUT/kernels" \
                     "${args[@]}" ;;
        data) export -f data_step; export PY OUT DATA_EXTRA
              run_step data "${DATA_S:-90}" bash -c data_step ;;
        *) echo "unknown step $step: choose from tests compare kernels data (or prepare)" >&2
           echo "$step unknown 0" >> "$OUT/summary.txt" ;;
    esac
done
echo "== summary (step, exit code, seconds)"
cat "$OUT/summary.txt"
