#!/bin/bash
# Every GPU check and benchmark of the project in one go, on a GPU host without registry access.
#
#   bash launch/gpu_bench.sh prepare        # development machine: wheels into .whl/, setup.sh into .gpu/
#   bash launch/gpu_bench.sh [STEP ...]     # GPU host, from the checkout's root (default: all steps)
#
# Steps, in order: tests (pytest -m gpu on the files that mark a test gpu, found at run time:
# tests/test_multi_gpu.py in a second pytest beside the rest), demo (make demo's job, python -m vutrain.demo --device cuda, with its 0.6 bar; started
# beside tests when both are asked for: neither times anything, and the GPU has room for both),
# compare (python -m vutrain.bench --compare open_clip, ZeRO-1 and 2), compile (the same with
# train.compile against open_clip compiled and as it ships, batch 256, ZeRO-1 first), e2e (python -m
# vutrain.bench: ViT-B/32 bf16 ZeRO-2 at batch 256 and 1024 through the real stream with the
# default worker count, against compare's pre-decoded rows), kernels (python -m kernels.bench),
# profile (tools/profile_step.py: is the batch-256 step bound by the GPU or the host?), data (python -m
# vutrain.bench data on synthetic 256-px shards, 8 workers, which also measures 1). Before any
# step, .gpu/setup.sh (a copy of shared/gpu/setup.sh) installs .whl/ into /tmp/site (at most
# SETUP_S=120 s) and prints what imports; wheels this host's python3 cannot install (another
# Python's, a second version of one package) are left out first, each named in wheels.log, and a
# failed set-up is reported (exit 1) but the steps still run. host.txt says which Python, GPU
# and disk the host has. Results: $OUT (default ./gpu_out) holds summary.txt
# (one line per step: name, exit code, seconds, then ran, failed, cut (at which limit), stopped or
# skipped (why); last, `rerun: bash launch/gpu_bench.sh STEP...` naming the steps cut or not
# started, a second call's command) and results.tgz (every log, pytest_gpu*.xml,
# compare_open_clip.json/.png, kernels/, e2e.json, data_w8.log): the device tool brings back at
# most 8 files. PACK=0 leaves the files unpacked. A failing step does not stop the next; the
# script exits 1 when any step failed (0 when every step that ran succeeded).
#
# Time: each step has a limit in seconds (TESTS_S=150, DEMO_S=150, COMPARE_S=170, COMPILE_S=150,
# PROFILE_S=80, KERNELS_S=110, E2E_S=110, DATA_S=40), and no step starts once TOTAL_S (default
# 540, the set-up and a step's 15-s kill grace inside it) is spent, so summary.txt is always
# written well inside the device tool's 600-s limit, and a 15-minute device lease keeps about 4
# minutes for a second, shorter call (on an H200 on 2026-12-04, summary.txt: set-up 58 s, tests 134 with the demo's 96
# beside them, compare 141, kernels 32 without torch.compile, e2e 45, data 27). The steps run
# in order of what the next GPU session most needs: compile right after compare, then e2e (the
# optimizer's share at 1024), kernels (torch.compile rows), profile; the compile step is new
# and unmeasured, so the last steps may find TOTAL_S spent. The default plan does not start a step whose
# own limit no longer fits, nor any after it (rerun: names them); the tests step's limit interrupts
# pytest (SIGINT), so a cut keeps its XML and failure list.
# The compare JSON is rewritten after every configuration and the kernels JSON on SIGTERM: a
# step cut short keeps what it measured. results.tgz is rewritten after every step, and a SIGTERM,
# SIGINT or SIGHUP to the script (the device tool's limit) stops the running step the same way,
# writes its summary line and starts no other: a call ended at its limit keeps what it measured
# (killed outright, the running step's files stay loose beside the archive). One step alone: e.g.
# `COMPARE_S=540 ... gpu_bench.sh compare`.
# Extra arguments: COMPARE_ARGS, KERNELS_ARGS, TESTS_ARGS (replace the defaults below; TESTS_ARGS
# the paths of the pytest beside the multi-GPU one, e.g. a rerun of the tests that failed);
# COMPARE_EXTRA, COMPILE_EXTRA, DEMO_EXTRA, E2E_EXTRA, PROFILE_EXTRA and DATA_EXTRA (appended to the defaults).
# A dry run on a CPU machine, to check every step's command line before GPU time is spent (tiny
# sizes; the GPU tests skip themselves):
#   GPU_SETUP=/dev/null PYTHON=.venv/bin/python COMPARE_EXTRA="--preset tiny --precision fp32
#   --batch-sizes 4 --steps 1 --warmup 1 --pool 8 --max-batch 8" COMPILE_EXTRA="--preset tiny
#   --precision fp32 --batch-sizes 4 --steps 1 --warmup 1 --pool 8 --compile-backend aot_eager"
#   KERNELS_ARGS=--quick
#   DATA_EXTRA="--batch-size 16 --batches 2 --decode-seconds 0.2" DEMO_EXTRA="--device cpu --steps 2
#   --num-samples 256 --val-samples 48 --shard-size 64 --min-top1 0" E2E_EXTRA="--preset tiny --precision fp32
#   --batch-sizes 8 --steps 1 --warmup 1 --workers 1" PROFILE_EXTRA="--preset tiny --precision fp32
#   --batch-size 8 --workers 0 --warmup 1 --steps 1" bash launch/gpu_bench.sh
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
    # A wheel left from an earlier prepare beside this one's version of it stops the whole install.
    rm -f .whl/*.whl .whl/*.tar.gz
    cp "$SHARED/gpu/setup.sh" .gpu/setup.sh
    # The GPU host runs Python 3.12 (see shared/gpu/README.md): binary wheels for it, one of each.
    P="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
    # The tested versions (constraints.txt) of what the host lacks; the host keeps its own torch.
    P="$P -c constraints.txt"
    python3 -m pip download -q $P -d .whl hjson pydantic pydantic_core annotated_types typing_inspection \
        typing_extensions "webdataset<0.3" braceexpand "open_clip_torch>=3.0" ftfy wcwidth inf_cl \
        pytest-timeout simplejpeg matplotlib contourpy cycler fonttools kiwisolver pyparsing
    python3 -m pip download -q --no-deps --no-binary=:all: -c constraints.txt -d .whl deepspeed  # source
    ls .whl
    echo "prepared: carry .whl and .gpu to the GPU host, then run: bash launch/gpu_bench.sh"
    exit 0
fi

OUT="${OUT:-$ROOT/gpu_out}"
mkdir -p "$OUT"
START=$SECONDS
TOTAL_S="${TOTAL_S:-540}"
# `timeout` kills a step this long after its TERM: counted inside TOTAL_S, so the script ends by
# TOTAL_S (plus the last pack) and not past the device tool's 600-s limit.
KILL_AFTER_S=15
STEPS=("$@")
# The default plan's limits add up to more than TOTAL_S (about 930 s with the set-up's): a step of
# it whose own limit no longer fits what is left is not started, nor any after it, and the rerun:
# line names them for the next call, in the same order. Steps named on the command line start
# with what is left (at least 20 s), as before.
DEFAULT_PLAN=0
[[ ${#STEPS[@]} -gt 0 ]] || { STEPS=(tests demo compare compile e2e kernels profile data); DEFAULT_PLAN=1; }
PLAN_FULL=0  # set once a default-plan step did not fit: the later ones wait for the next call

SETUP="${GPU_SETUP:-.gpu/setup.sh}"  # GPU_SETUP: another set-up script (a dry run on a CPU machine)
if [[ ! -r "$SETUP" ]]; then
    echo "$SETUP missing: run 'bash launch/gpu_bench.sh prepare' first" >&2
    exit 1
fi
unset TRITON_INTERPRET  # compiled kernels on the GPU, never the CPU interpreter
# A step killed at its limit keeps the lines it printed (setup.sh sets it too, when it gets there).
export PYTHONUNBUFFERED=1

# The device tool brings back at most 8 files: summary.txt and one archive of the rest. Packed
# after every step, not only at the end: a call killed at its limit (no EXIT trap runs) still
# leaves the finished steps' files in results.tgz and only the running step's loose beside it.
# Packed files wait in STAGE (outside $OUT); the archive is written outside $OUT too (tar
# fails with "file changed as we read it" when $OUT gains the file it writes), then copied in
# and renamed into place whole.
STAGE=$(mktemp -d -t gpu_results.XXXXXX)
pack() {
    [[ "${PACK:-1}" == 1 ]] || return 0
    local part="$OUT/.results.tgz.part"
    local keep=(! -name summary.txt ! -name results.tgz ! -name .results.tgz.part)
    tar czf "$STAGE.tgz" --exclude=summary.txt --exclude=results.tgz --exclude=.results.tgz.part \
        -C "$STAGE" . -C "$OUT" . &&
        cp "$STAGE.tgz" "$part" &&
        find "$OUT" -mindepth 1 -maxdepth 1 "${keep[@]}" -exec cp -a -t "$STAGE" {} + &&
        find "$OUT" -mindepth 1 -maxdepth 1 "${keep[@]}" -exec rm -rf {} + &&
        mv "$part" "$OUT/results.tgz"
}
trap 'pack && rm -rf "$STAGE" "$STAGE.tgz"' EXIT
# The device tool's limit (or ^C) signals this shell, not the steps: each runs under its own
# `timeout`, in a process group of its own. Pass the signal on, so the running step stops now and
# writes what it measured (the compare and kernels reports), then end after its summary line.
STOP=0
stop_steps() {
    STOP=1
    [[ -z "${STEP_PID:-}" ]] || kill -TERM "$STEP_PID" 2>/dev/null
    [[ -z "${demo_pid:-}" ]] || kill -TERM "$demo_pid" 2>/dev/null
}
trap stop_steps TERM INT HUP

# The wheels setup.sh installs, checked against this host's Python before pip sees them: pip
# refuses the whole set for one wheel of another Python (prepare fetches cp312, the Python the
# GPU image had) or for two versions of one package (a stale wheel beside a new one), and the
# call then measured nothing. Wheels that cannot install are left out, each with a line saying why;
# the rest go to setup.sh as WHEELS, links in a folder of their own.
select_wheels() {
    local src="${WHEELS:-.whl}" picked
    [[ -d "$src" ]] || return 0
    picked=$(mktemp -d -t gpu_wheels.XXXXXX)
    if python3 - "$src" "$picked" > "$OUT/wheels.log" 2>&1 <<'PY'
import os
import sys

try:
    from packaging.tags import sys_tags
    from packaging.utils import parse_sdist_filename, parse_wheel_filename
except ImportError:  # the host's pip carries its own copy
    from pip._vendor.packaging.tags import sys_tags
    from pip._vendor.packaging.utils import parse_sdist_filename, parse_wheel_filename

src, dst = sys.argv[1:3]
host = set(sys_tags())
python = f"cp{sys.version_info[0]}{sys.version_info[1]}"
newest = {}  # project name: (version, file)
for name in sorted(os.listdir(src)):
    try:
        if name.endswith(".whl"):
            project, version, _, tags = parse_wheel_filename(name)
            if not tags & host:
                built = ",".join(sorted({t.interpreter for t in tags}))
                print(f"left out {name}: built for {built}, this host's python3 is {python} "
                      f"({sys.version.split()[0]}); prepare the wheels with --python-version for it")
                continue
        elif name.endswith((".tar.gz", ".zip")):  # a source archive (deepspeed), built there
            project, version = parse_sdist_filename(name)
        else:
            continue
    except Exception as exc:  # packaging's InvalidWheelFilename and the like
        print(f"left out {name}: not a wheel's or source archive's name ({exc})")
        continue
    kept = newest.get(project)
    if kept is not None:
        old, new = sorted([kept, (version, name)])
        print(f"left out {old[1]}: {new[1]} is a newer version of {project} (pip takes one of each)")
    newest[project] = max(kept, (version, name)) if kept else (version, name)
for _, name in newest.values():
    os.symlink(os.path.abspath(os.path.join(src, name)), os.path.join(dst, name))
print(f"wheels: {len(newest)} of {src} installable here, for {python}")
PY
    then
        export WHEELS="$picked"
    else
        echo "wheels not checked (python3 failed, wheels.log): setup.sh installs $src as it is" >> "$OUT/wheels.log"
    fi
    cat "$OUT/wheels.log" >> "$OUT/setup.log"
}

host_report() {  # what the host is, said rather than assumed: the timings and memory depend on it
    echo "host python: $("$PY" -c 'import sys; print(sys.version.split()[0], sys.executable)' 2>&1)"
    if command -v nvidia-smi > /dev/null; then
        echo "host gpu: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1)"
    else
        echo "host gpu: none found (no nvidia-smi)"
    fi
    df -h /tmp "$ROOT" 2>&1 | sed 's/^/host disk: /'
}

# The install under a time limit (a hang must not eat the lease), once: the variables it exports
# (PYTHONPATH, PATH) come back through a file, instead of a second, untimed `source` that ran
# setup.sh's import check (torch, deepspeed, transformers) again.
capture_setup() {  # capture_setup SCRIPT ENV_FILE, in a child shell: source SCRIPT, write what it exported
    local name
    declare -A before=()
    for name in $(compgen -e); do before[$name]=${!name}; done
    # shellcheck disable=SC1090
    source "$1" || return
    for name in $(compgen -e); do
        case $name in SHLVL | _ | OLDPWD | PWD | SHELLOPTS | BASHOPTS) continue ;; esac
        [[ -n ${before[$name]+set} && ${before[$name]} == "${!name}" ]] ||
            printf 'export %s=%q\n' "$name" "${!name}"
    done > "$2"
}
: > "$OUT/setup.log"
select_wheels
export -f capture_setup
setup_env=$(mktemp -t gpu_setup_env.XXXXXX)
timeout --kill-after=10 "${SETUP_S:-120}" bash -c 'capture_setup "$1" "$2"' _ "$SETUP" "$setup_env" \
    >> "$OUT/setup.log" 2>&1
setup_rc=$?
# shellcheck disable=SC1090
(( setup_rc == 0 )) && source "$setup_env"
rm -f "$setup_env"
echo "setup $setup_rc $((SECONDS - START))" > "$OUT/summary.txt"
cat "$OUT/setup.log"
if (( setup_rc != 0 )); then
    # Not the end of the call: the steps that need only the host's own packages (kernels: torch and
    # triton) still measure, and the lease is not spent for nothing. Exit code 1 all the same.
    echo "setup failed (exit $setup_rc): see setup.log; the steps run with the host's own packages" >&2
fi
PY="${PYTHON:-python3}"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
host_report | tee "$OUT/host.txt"
# Hugging Face's `kernels` (required by transformers>=5.25) has the import name of our `kernels`
# package, and transformers would import ours in its place; it runs without it (README).
if "$PY" -c "import importlib.metadata as m; m.version('kernels')" 2>/dev/null; then
    "$PY" -m pip uninstall -y -q kernels >> "$OUT/setup.log" 2>&1 || echo "kernels: not uninstalled" >&2
fi

# limit SECONDS: the step's own limit, or less when the total budget is nearly spent
limit() {
    local left=$((TOTAL_S - KILL_AFTER_S - (SECONDS - START)))
    (( left < $1 )) && echo "$left" || echo "$1"
}

run_step() {  # run_step NAME LIMIT_S COMMAND...  (SUMMARY: where its line goes)
    local name=$1 own=$2 max summary="${SUMMARY:-$OUT/summary.txt}"; max=$(limit "$2"); shift 2
    if (( PLAN_FULL )) || (( DEFAULT_PLAN && max < own )); then
        PLAN_FULL=1
        echo "$name skipped 0 (not started: the default plan's limit of $own s does not fit the $max s left of TOTAL_S=$TOTAL_S; next call)" >> "$summary"
        return
    fi
    if (( max < 20 )); then
        echo "$name skipped 0 (not started: $max s left of TOTAL_S=$TOTAL_S)" >> "$summary"
        return
    fi
    local t0=$SECONDS rc
    echo "== $name (limit ${max}s): $*"
    # In the background: a signal's trap runs at once instead of after the step (see stop_steps).
    STEP_LIMIT_S=$max timeout --signal=TERM --kill-after="$KILL_AFTER_S" "$max" "$@" > "$OUT/$name.log" 2>&1 &
    STEP_PID=$!
    wait_for "$STEP_PID"
    rc=$?
    STEP_PID=
    tail -n 40 "$OUT/$name.log"
    # What happened, after the exit code: a cut step's 124 or 137 read like any failure, and the
    # summary did not say whether the step's own limit or what was left of TOTAL_S ended it.
    local how=ran
    if (( STOP )); then
        how="stopped (the call was signalled)"
    elif (( rc == 124 || rc == 137 )); then
        how="cut at its limit of $max s"
        (( max < own )) && how="cut at $max s, what was left of TOTAL_S=$TOTAL_S (its own limit: $own s)"
    elif (( rc != 0 )); then
        how=failed
    fi
    echo "$name $rc $((SECONDS - t0)) $how" >> "$summary"
}

wait_for() {  # wait_for PID: its exit code; `wait` returns early when a trapped signal arrives
    local rc
    wait "$1"
    rc=$?
    while kill -0 "$1" 2>/dev/null; do
        wait "$1"
        rc=$?
    done
    return "$rc"
}

gpu_test_files() {  # the test files that mark a test `gpu`, found at run time: a new one is never missed
    grep -rlE --include='test_*.py' --include='*_test.py' 'mark\.gpu\b' tests | sort
}

tests_step() {  # two pytest processes at once: the multi-GPU launches, and every other GPU test
    set -f  # TESTS_ARGS split on spaces, never globbed: node ids like test_x[1] are patterns
    local common=(-q -m gpu -p no:cacheprovider) multi main rc files
    # The step's TERM (its limit, or the call signalled) went to its whole process group and killed
    # pytest before it wrote its XML or its failure list. Each pytest runs under a `timeout` of its
    # own, in a group of its own out of that TERM's reach; the trap passes it on as SIGINT, on which
    # pytest stops and writes both. Its `timeout` (STEP_LIMIT_S from run_step, 5 s more) is only a
    # backstop, ending it inside the step's 15-s kill grace.
    local stop=(timeout --signal=INT --kill-after=5 "$(( ${STEP_LIMIT_S:-150} + 5 ))")
    trap 'kill -INT $multi $main 2>/dev/null' TERM
    # Only the files that hold GPU tests: `-m gpu tests/` imported and collected the whole suite
    # (about 2,300 tests) to select about 55. None found: the whole suite, as before.
    files=$(gpu_test_files | grep -vx tests/test_multi_gpu.py | tr '\n' ' ')
    [[ -n "$files" ]] || files="tests/ --ignore=tests/test_multi_gpu.py"
    "${stop[@]}" "$PY" -m pytest "${common[@]}" tests/test_multi_gpu.py \
        --junitxml="$OUT/pytest_multi_gpu.xml" > "$OUT/tests_multi_gpu.log" 2>&1 &
    multi=$!
    # shellcheck disable=SC2086  # TESTS_ARGS: test paths or node ids instead of every other file
    "${stop[@]}" "$PY" -m pytest "${common[@]}" ${TESTS_ARGS:-$files} \
        --junitxml="$OUT/pytest_gpu.xml" &
    main=$!
    wait_for "$main"
    rc=$?
    wait_for "$multi"
    local multi_rc=$?
    echo "== tests/test_multi_gpu.py (exit $multi_rc)"
    tail -n 30 "$OUT/tests_multi_gpu.log"
    (( rc != 0 )) && return "$rc"
    return "$multi_rc"
}

data_step() {  # runs in its own bash (run_step's timeout): set its options here
    set -o pipefail  # a failing benchmark, not tee, decides the exit code
    local shards dir rc
    dir=$(mktemp -d -t gpu_bench_data.XXXXXX) || return 1
    shards=$("$PY" -c "from vutrain.data.synthetic import write_synthetic as w
info = w('$dir', num_samples=1024, shard_size=128, image_size=256, val_samples=0)
print(info['train_shards'])") || { rm -rf "$dir"; return 1; }
    # 8 workers; the benchmark measures 1 worker in the same round too (the scaling figure).
    # shellcheck disable=SC2086  # DATA_EXTRA: more options, split on spaces (a CPU dry run's sizes)
    "$PY" -m vutrain.bench data --shards "$shards" --workers 8 --batch-size 256 --image-size 224 \
        --rounds 1 ${DATA_EXTRA:-} | tee "$OUT/data_w8.log"
    rc=$?
    rm -rf "$dir"
    return "$rc"
}

demo_step() {  # make demo's job on the GPU (its recipe: one rank, bf16), out of the checkout
    local dir rc; dir=$(mktemp -d /tmp/gpu_bench_demo.XXXXXX) || return 1
    # shellcheck disable=SC2086  # DEMO_EXTRA: more options, split on spaces (a CPU dry run's sizes)
    "$PY" -m vutrain.demo --device cuda --out "$dir" ${DEMO_EXTRA:-}
    rc=$?
    rm -rf "$dir"
    return "$rc"
}

e2e_step() {  # the trainer fed by the real stream (data.num_workers=-1: the default worker count);
    # 1024 too: the optimizer's share of the step at 1024 is one of issue 9's targets
    # shellcheck disable=SC2086  # E2E_EXTRA: more options, split on spaces (a CPU dry run's sizes)
    "$PY" -m vutrain.bench --preset vit-b-32 --precision bf16 --zero-stage 2 --batch-sizes 256,1024 \
        --workers -1 --steps 8 --warmup 4 --hidden-act gelu --out "$OUT/e2e.json" ${E2E_EXTRA:-}
}

profile_step() {  # where batch 256's step waits: GPU busy time against host time per phase
    # shellcheck disable=SC2086  # PROFILE_EXTRA: more options, split on spaces (a CPU dry run's sizes)
    "$PY" tools/profile_step.py --preset vit-b-32 --precision bf16 --batch-size 256 --zero-stage 1 \
        --workers 8 --warmup 6 --steps 3 --hidden-act gelu ${PROFILE_EXTRA:-}
}

# The default comparison (ZeRO-2: one rank), searches ending 50 s before the limit. 10 steps after
# 4: with 6 after 2 (2026-12-04) the first configuration in the process (ZeRO-2, torch loss) ran
# at 90 ms a step at batch 256, where the e2e run timed the same configuration at 78 ms.
compare_args() {
    local max; max=$(limit "${COMPARE_S:-170}")
    args=(--batch-sizes 256,1024 --steps 10 --warmup 4 --zero-stages 1,2
          --search "open_clip,vutrain z2 torch,vutrain z2 triton ckpt"
          --deadline-min "$(awk "BEGIN { print ($max - 50) / 60 }")")
    [[ -z "${COMPARE_ARGS:-}" ]] || eval "args=($COMPARE_ARGS)"
    [[ -z "${COMPARE_EXTRA:-}" ]] || eval "args+=($COMPARE_EXTRA)"  # appended: later options win
}

# train.compile against open_clip's --torchcompile and as it ships, at batch 256 only (1024
# passed eager): whether compiling the towers takes 256 past 1.1x (the eager step is host-bound).
# ZeRO-1 first (on one GPU it has no per-parameter gradient hooks: the leaner host side), so a
# step cut at its limit loses ZeRO-2's row, not the baselines.
compile_args() {
    args=(--batch-sizes 256 --steps 10 --warmup 4 --zero-stages 1,2 --loss-backends triton
          --grad-ckpt off --compile on --search none)
    [[ -z "${COMPILE_EXTRA:-}" ]] || eval "args+=($COMPILE_EXTRA)"
}

# fwd+bwd only: every target is judged on it, and torch.compile compiles once per case. The
# compile rows last in each case: a step cut at its limit then loses a baseline, not our rows.
DEFAULT_KERNELS_ARGS="--shapes 32768x32768x768,4096x32768x768 --providers eager,ours,inf_cl,compile
                      --modes fwd+bwd"
pack  # setup.log and nvidia-smi.txt: the first step's files then fit beside the archive
for step in "${STEPS[@]}"; do
    if (( STOP )); then  # a signal: the steps left do not start, and their lines say so
        [[ $step == demo && -n "${tests_started:-}" ]] && continue  # it started beside the tests
        echo "$step skipped 0 (not started: the call was signalled)" >> "$OUT/summary.txt"
        continue
    fi
    case "$step" in
        tests) export -f tests_step gpu_test_files demo_step wait_for; export PY OUT DEMO_EXTRA TESTS_ARGS
               demo_pid=
               if [[ " ${STEPS[*]} " == *" demo "* ]]; then  # beside the tests: its line after theirs
                   rm -f "$OUT/.demo_summary"
                   # a subshell resets traps: it sets its own, to pass a signal on to the demo
                   (trap stop_steps TERM INT HUP
                    SUMMARY="$OUT/.demo_summary" run_step demo "${DEMO_S:-150}" bash -c demo_step) &
                   demo_pid=$!
               fi
               tests_started=1
               run_step tests "${TESTS_S:-150}" bash -c tests_step
               if [[ -n "$demo_pid" ]]; then
                   wait_for "$demo_pid"
                   demo_pid=
                   cat "$OUT/.demo_summary" >> "$OUT/summary.txt" 2>/dev/null ||
                       echo "demo ? 0 (no result line)" >> "$OUT/summary.txt"
                   rm -f "$OUT/.demo_summary"
               fi ;;
        demo) [[ " ${STEPS[*]} " == *" tests "* ]] && continue  # it ran beside the tests
              export -f demo_step; export PY DEMO_EXTRA
              run_step demo "${DEMO_S:-150}" bash -c demo_step ;;
        compare) compare_args
                 run_step compare "${COMPARE_S:-170}" "$PY" -m vutrain.bench --compare open_clip \
                     "${args[@]}" --out "$OUT/compare_open_clip.json" ;;
        compile) compile_args
                 run_step compile "${COMPILE_S:-150}" "$PY" -m vutrain.bench --compare open_clip \
                     "${args[@]}" --out "$OUT/compare_compiled.json" ;;
        kernels) eval "args=(${KERNELS_ARGS:-$DEFAULT_KERNELS_ARGS})"
                 run_step kernels "${KERNELS_S:-110}" "$PY" -m kernels.bench --out "$OUT/kernels" \
                     "${args[@]}" ;;
        e2e) export -f e2e_step; export PY OUT E2E_EXTRA
             run_step e2e "${E2E_S:-110}" bash -c e2e_step ;;
        profile) export -f profile_step; export PY PROFILE_EXTRA
                 run_step profile "${PROFILE_S:-80}" bash -c profile_step ;;
        data) export -f data_step; export PY OUT DATA_EXTRA
              run_step data "${DATA_S:-40}" bash -c data_step ;;
        *) echo "unknown step $step: choose from tests demo compare compile kernels e2e profile data (or prepare)" >&2
           echo "$step unknown 0" >> "$OUT/summary.txt" ;;
    esac
    pack  # what this step wrote, into results.tgz now: a kill later keeps it
done
# The steps that were cut or never started, as the command of a second call (a lease's 15 minutes
# leave room for one): the default order does not fit one call.
rerun=$(awk '$1 != "setup" && $1 != "rerun:" && ($2 == "skipped" || $4 == "cut" || $4 == "stopped") \
             { printf " %s", $1 }' "$OUT/summary.txt")
[[ -z "$rerun" ]] || echo "rerun: bash launch/gpu_bench.sh$rerun" >> "$OUT/summary.txt"
echo "== summary (step, exit code, seconds, what happened)"
cat "$OUT/summary.txt"
# The script's own exit code says whether every step that ran succeeded (a step skipped for lack
# of time is not a failure; its line says so): the device tool reports it, and it was always 0.
awk '$1 != "rerun:" && $2 != "skipped" && $2 != "0" { bad = 1 } END { exit bad }' "$OUT/summary.txt"
