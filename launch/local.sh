#!/bin/bash
# One node through the deepspeed launcher: NGPUS GPU ranks, or CPU ranks when there is no GPU.
#
#   NGPUS=8 launch/local.sh --config vutrain/configs/vit-b-32.yaml output_dir=runs/b32 [key=value ...]
#   NGPUS=2 launch/local.sh --config vutrain/configs/tiny.yaml        # no GPU: 2 CPU ranks (gloo)
#
# Environment: NGPUS (ranks; default all visible GPUs, or 1 CPU rank without GPU; with
# CUDA_VISIBLE_DEVICES set, the first NGPUS of those),
# MASTER_PORT (default: a free port of 20000-32767, named in the start-up line; a given one that
# is taken is an error), HOSTFILE (optional: a one-host DeepSpeed hostfile to use instead
# of NGPUS, "HOST slots=N"; it must exist; no ssh is needed; with CUDA_VISIBLE_DEVICES set, the
# first N of those), PYTHON (default python).
# A second local.sh run into the output_dir of one still running on this host stops in one line.
# Ctrl-C reaches the launcher, which stops the ranks; SIGTERM or SIGUSR1 to this script (or
# SIGUSR1 to a rank) checkpoints the ranks and the run exits 75 (resume with the same command:
# train.resume=auto is the default).
# Exit status: the launcher's, except a 0 for a run that left no done.json: 75 when it left
# preempted.json, else 1 with one line (deepspeed's runner exits 0 when its launch.py is killed by a
# signal, also before the trainer started), and 75 for a launcher that failed or was killed (a
# SIGTERM to the whole process group, scancel, or to launch.py alone) whose ranks left
# preempted.json. Processes that outlive the launcher (ranks of a killed launch.py, a launch.py
# whose runner was killed) are sent SIGTERM (they checkpoint) and, VUTRAIN_LEFTOVER_WAIT seconds
# later (default 300), SIGKILL.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[[ -f "$ROOT/vutrain/train.py" ]] || die "$ROOT/vutrain/train.py not found; run launch/local.sh from a checkout of the repository."
# The ranks run in the caller's directory, so a relative --config, output_dir, shard list or
# HOSTFILE means what it means to the caller, as for `deepspeed vutrain/train.py` typed by hand:
# the script used to cd to the repository, where `--config my_run.yaml` was "not found" and a
# relative output_dir landed inside the checkout.
if [[ "$PWD" -ef "$ROOT" ]]; then TRAIN_PY=vutrain/train.py; else TRAIN_PY="$ROOT/vutrain/train.py"; fi

# add_rank_placement NGPUS GPUS: place the ranks (append to `launcher`, or narrow the visible
# GPUs). Given --num_gpus, deepspeed deletes CUDA_VISIBLE_DEVICES and uses GPUs 0..N-1 of the
# machine (CUDA_VISIBLE_DEVICES=4,5,6,7 trained on GPUs 0-3, perhaps someone else's). Without
# --num_gpus/--include it turns CUDA_VISIBLE_DEVICES into its own --include (its documented way),
# so the variable is narrowed to the first NGPUS ids and no placement argument is passed. UUID
# entries (GPU-..., MIG-...) are beyond --include: they keep --num_gpus, with a warning.
add_rank_placement() {
    local ngpus="$1" gpus="$2" visible="${CUDA_VISIBLE_DEVICES:-}"
    visible="${visible// /}"
    if (( gpus > 0 )) && [[ "$visible" =~ ^[0-9]+(,[0-9]+)*$ ]]; then
        local ids
        ids="$(cut -d, -f1-"$ngpus" <<<"$visible")"
        log "CUDA_VISIBLE_DEVICES=$visible: ranks on GPUs $ids (deepspeed's --include localhost:$ids)"
        export CUDA_VISIBLE_DEVICES="$ids"
        return 0
    fi
    if (( gpus > 0 )) && [[ -n "$visible" ]]; then
        log "WARNING: CUDA_VISIBLE_DEVICES=$visible is not a list of GPU indices, which deepspeed's --include needs; --num_gpus $ngpus uses GPUs 0..$((ngpus - 1)) of the machine"
    fi
    launcher+=(--num_gpus "$ngpus")
}

# rendezvous_port: MASTER_PORT as given (a taken one refused here, in one line, before any rank
# starts), or a free port when it is unset: the fixed default, 29500, stopped a second run on the
# same machine (two experiments, a test beside a real run) with EADDRINUSE. local.sh is one node,
# so no other host has to agree on the port. Sets PORT and PORT_ORIGIN.
rendezvous_port() {
    if [[ -n "${MASTER_PORT:-}" ]]; then
        check_master_port "$MASTER_PORT"
        PORT=$((10#$MASTER_PORT))
        PORT_ORIGIN="MASTER_PORT"
        if master_port_taken "$PORT"; then
            die "MASTER_PORT=$PORT is taken on this host (another run?). Set MASTER_PORT to a free port, or unset it to have a free one picked."
        fi
        hold_port_lock "$PORT" \
            || die "MASTER_PORT=$PORT is held by another launch/local.sh run on this host, whose ranks have not bound it yet. Set MASTER_PORT to another free port, or unset it to have a free one picked."
        return 0
    fi
    local attempt
    # A port another launch drew in the same instant is locked by it: draw again.
    for attempt in 1 2 3 4 5; do
        PORT="$(free_master_port)"
        [[ -n "$PORT" ]] || die "could not find a free port with PYTHON=${PYTHON:-python}; set MASTER_PORT to a free port."
        if hold_port_lock "$PORT"; then
            PORT_ORIGIN="free port: MASTER_PORT unset"
            return 0
        fi
        log "port $PORT was drawn by another launch at the same time (draw $attempt); drawing again"
    done
    die "every port drawn was held by another launch on this host; set MASTER_PORT to a free port."
}

# run_output_dir ARGS...: the output_dir the trainer arguments give (the YAML's included), empty
# when they do not parse: common.sh's `python -m vutrain.config --get`, run through `-c` since a PYTHON
# wrapper (the tests' stand-ins) may take any other `-m` call for the deepspeed launcher.
run_output_dir() {
    PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c \
        'import runpy; runpy.run_module("vutrain.config", run_name="__main__", alter_sys=True)' \
        --get output_dir "$@" 2>/dev/null || true
}

# hold_run_lock OUT_DIR: lock the run's output_dir (run_output_dir's answer) for the rest of
# this launch, or stop in one line when another local.sh run on this host holds it. Two runs in one
# output_dir (the same command started again in another terminal while the first trains) both
# trained, wrote their checkpoints into one checkpoints/ and each resumed from the other's, without a
# word. The lock is a file in /tmp named after the absolute path (a relative and an absolute
# spelling are one run), so nothing is written into the run directory before the trainer checks it;
# the kernel drops it when this script and the launcher it starts exit, however they end. Taken
# after the port, so a port refusal still comes first.
hold_run_lock() {
    local out="$1" abs file
    # Unreadable arguments: the trainer reports them itself.
    [[ -n "$out" ]] && command -v flock >/dev/null 2>&1 || return 0
    abs="$(realpath -m -- "$out")"
    file="/tmp/vutrain-run-$(printf '%s' "$abs" | sha1sum | cut -c1-16).lock"
    [[ -e "$file" ]] || { : >>"$file"; } 2>/dev/null
    { exec {RUN_LOCK_FD}<"$file"; } 2>/dev/null || return 0
    # -w 10: a launch that ends in a moment (a stand-in launcher, a run refused at start-up) is
    # waited for; a run that trains holds it for hours.
    flock -x -w 10 "$RUN_LOCK_FD" \
        || die "output_dir $abs is in use by another launch/local.sh run on this host (lock $file): two runs in one output_dir overwrite and resume from each other's checkpoints. Wait for that run to end (or stop it), or give this one another output_dir=..."
}

PY="${PYTHON:-python}"
GPUS="$(count_gpus)"
LEFTOVER_WAIT="${VUTRAIN_LEFTOVER_WAIT:-300}"
is_uint "$LEFTOVER_WAIT" || die "VUTRAIN_LEFTOVER_WAIT=$LEFTOVER_WAIT is not a whole number of seconds. Set it to e.g. 300, or unset it."
launcher=("$PY" -u -m deepspeed.launcher.runner)

if [[ -n "${HOSTFILE:-}" ]]; then
    [[ -f "$HOSTFILE" ]] || die "HOSTFILE=$HOSTFILE does not exist. Create it with launch/make_hostfile.sh -s N localhost, or unset HOSTFILE and set NGPUS."
    refuse_hostfile_bom "$HOSTFILE" "HOSTFILE=$HOSTFILE"
    # sub(/\r$/): a hostfile saved with Windows line ends (which DeepSpeed reads) was refused with
    # "got slots '2\r'", and a blank line of it counted as a second host.
    nhosts="$(awk '{sub(/\r$/, "")} NF && $1 !~ /^#/' "$HOSTFILE" | wc -l)"
    (( nhosts == 1 )) || die "HOSTFILE=$HOSTFILE lists $nhosts hosts; local.sh runs one node. Use launch/slurm/deepspeed.sbatch for several nodes."
    [[ -z "${NGPUS:-}" ]] || die "set either HOSTFILE or NGPUS, not both."
    # A second field without "slots=" ("localhost 2") reads as none: deepspeed stopped on it with a
    # ValueError traceback once its runner had started.
    slots="$(awk '{sub(/\r$/, "")} NF && $1 !~ /^#/ {print ($2 ~ /^slots=/ ? substr($2, 7) : "")}' "$HOSTFILE")"
    is_uint "$slots" && (( 10#$slots > 0 )) || die "HOSTFILE=$HOSTFILE: expected one 'HOST slots=N' line, got slots '$slots'."
    slots=$((10#$slots))
    if (( GPUS > 0 && slots > GPUS )); then
        die "HOSTFILE=$HOSTFILE asks for $slots slots but only $GPUS GPUs are visible; lower slots to $GPUS."
    fi
    check_world_size "$slots" "HOSTFILE slots=$slots"
    log "hostfile $HOSTFILE: $(cat "$HOSTFILE")"
    # :-: unset is the usual case on a GPU workstation (set -u stopped the script there with
    # "CUDA_VISIBLE_DEVICES: unbound variable").
    visible="${CUDA_VISIBLE_DEVICES:-}"
    if (( GPUS > 0 )) && [[ -n "${visible// /}" ]]; then
        # With a hostfile deepspeed ignores CUDA_VISIBLE_DEVICES and gives the ranks GPUs
        # 0..slots-1 of the machine; one host is NGPUS=slots, placed on the visible GPUs (UUIDs,
        # which --include cannot take, with the same warning as without a hostfile).
        add_rank_placement "$slots" "$GPUS"
    else
        # One host never needs ssh: without --no_ssh_check the launcher tries `ssh HOST hostname`
        # first (and fails where there is no passwordless ssh to it); it wants a master address.
        launcher+=(--hostfile "$HOSTFILE" --master_addr 127.0.0.1 --no_ssh_check)
    fi
else
    if [[ -z "${NGPUS:-}" ]]; then
        NGPUS=$(( GPUS > 0 ? GPUS : 1 ))
    fi
    # 10#: bash arithmetic reads a leading zero as octal (NGPUS=08 printed "value too great for base")
    is_uint "$NGPUS" && (( 10#$NGPUS > 0 )) || die "NGPUS must be a positive integer, got '$NGPUS'."
    NGPUS=$((10#$NGPUS))
    if (( GPUS > 0 && NGPUS > GPUS )); then
        die "NGPUS=$NGPUS but only $GPUS GPUs are visible; set NGPUS<=$GPUS."
    fi
    check_world_size "$NGPUS" "NGPUS=$NGPUS"
    if (( GPUS == 0 )); then
        log "no GPU visible: $NGPUS CPU rank(s) with gloo"
    fi
    add_rank_placement "$NGPUS" "$GPUS"
fi
if [[ " ${launcher[*]} " != *" --hostfile "* ]]; then
    # A missing hostfile plus --num_gpus makes the launcher start NGPUS local ranks even on the
    # CPU accelerator, and keeps CUDA_VISIBLE_DEVICES as its --include; a stale /job/hostfile (its
    # default) would instead be read as the list of nodes and ignore both.
    launcher+=(--hostfile /dev/null/none)
fi
rendezvous_port
# --save_pid: launch.py writes /tmp/<runner pid>.deepspeed as it comes up, before it starts the ranks:
# the one sign that it started, for a runner that exits 0 once launch.py is killed (see the end).
launcher+=(--master_port "$PORT" --save_pid)
log "rendezvous at 127.0.0.1:$PORT ($PORT_ORIGIN)"
OUT_DIR="$(run_output_dir "$@")"
hold_run_lock "$OUT_DIR"
RUN_STAMP="$(run_config_stamp "$OUT_DIR")"

# status_of_signalled_runner RC OUT_DIR STAMP: 75 when the runner failed (RC neither 0 nor 75) in a
# launch whose trainer started (config.yaml's stamp changed from STAMP; the trainer deletes an old
# preempted.json at its start) and left preempted.json (written only after a checkpoint of every
# rank); else RC. A SIGTERM to the whole process group (scancel, a supervisor) kills the runner at
# once while the ranks checkpoint: local.sh exited 143. A SIGTERM to launch.py alone (a supervisor
# that signals the pid it started) passes it to the ranks, which checkpoint, and then exits 1:
# local.sh exited 1. A resume-on-75 loop took either for a failure.
status_of_signalled_runner() {
    local rc="$1" out_dir="$2" stamp="$3" how
    if [[ "$rc" != 0 && "$rc" != "$VUTRAIN_EXIT_PREEMPTED" ]] \
        && [[ -n "$out_dir" && -e "$out_dir/preempted.json" ]] \
        && [[ "$(run_config_stamp "$out_dir")" != "$stamp" ]]; then
        how="exited $rc"
        (( rc <= 128 )) || how="died of signal $((rc - 128))"
        log "the launcher $how, but the ranks checkpointed ($out_dir/preempted.json): exiting $VUTRAIN_EXIT_PREEMPTED; resume with the same command"
        echo "$VUTRAIN_EXIT_PREEMPTED"
    else
        echo "$rc"
    fi
}

signal_ranks() {
    local launch_pids rank_pids
    launch_pids="$(children_of "$launcher_pid")"
    # shellcheck disable=SC2086  # one pid per word
    rank_pids="$(if [[ -n "$launch_pids" ]]; then children_of $launch_pids; fi)"
    if [[ -n "$rank_pids" ]]; then
        log "got SIG$1: passing it to the ranks, which checkpoint and exit $VUTRAIN_EXIT_PREEMPTED"
        # shellcheck disable=SC2086
        kill -"$1" $rank_pids 2>/dev/null || true
    else
        log "got SIG$1 before the ranks started: stopping the launcher"
        # shellcheck disable=SC2086
        kill -TERM $launch_pids "$launcher_pid" 2>/dev/null || true
    fi
}

# The runner is not exec'd in place of this script: on one node it installs no signal handler, so a TERM or USR1 sent to
# this pid (`kill PID`, `docker stop`, a supervisor) killed the runner alone (exit 143/138) while
# launch.py and the ranks trained on, orphaned, with no checkpoint. TERM and USR1 go to the ranks
# instead (the children of launch.py, the runner's child): they checkpoint and exit 75, which
# launch.py and the runner return. Ctrl-C already reaches every process of the foreground group
# (launch.py stops the ranks), so INT here only keeps this script waiting for that exit code.
#
# <&0: a background job's stdin would be /dev/null (a breakpoint() in a rank needs the terminal)
# VUTRAIN_LAUNCH_ID: every process of this launch carries it (stop_launch_leftovers finds them by it).
LAUNCH_ID="$$-$(date +%s%N)-$RANDOM"
# The subshell clears a stale --save_pid file of its own pid, the runner's once it execs
# (clear_launch_pid_file: exit 2 with one line when it cannot).
(
    clear_launch_pid_file "$BASHPID"
    export VUTRAIN_LAUNCH_ID="$LAUNCH_ID"
    exec "${launcher[@]}" "$TRAIN_PY" "$@"
) <&0 &
launcher_pid=$!
LAUNCH_PID_FILE="/tmp/$launcher_pid.deepspeed"
trap 'signal_ranks TERM' TERM
trap 'signal_ranks USR1' USR1
trap ':' INT
# A launch.py killed while it still imports DeepSpeed (before it writes LAUNCH_PID_FILE) made the
# runner exit 0, and local.sh took that for a finished run: wait_for_runner watches for it.
wait_for_runner "$launcher_pid"
launcher_rc="$RUNNER_RC"
launched="$(launch_py_came_up "$LAUNCH_PID_FILE")"
(( LAUNCH_PY_SEEN == 0 )) || launched=1
# Ranks whose launch.py was killed train on after the runner returned; stopped before the run
# directory is read, since they may still write its preempted.json.
trap '' TERM USR1
stop_launch_leftovers "$LAUNCH_ID" "$LEFTOVER_WAIT" || true
launcher_rc="$(status_of_signalled_runner "$launcher_rc" "$OUT_DIR" "$RUN_STAMP")"
# The runner's 0 is not always a finished run (a launch.py killed by a signal): see common.sh.
exit "$(checked_exit_status "$launcher_rc" "$OUT_DIR" "$RUN_STAMP" "$launched")"
