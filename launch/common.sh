# shellcheck shell=bash
# Helpers sourced by the launch scripts (not run directly).
#
# die/log, repository discovery, GPU counting, SLURM node lists and addresses, the
# .deepspeed_env writer, and run_preemptible: the signal-forwarding and requeue logic that
# both sbatch scripts share.

# Exit code the trainer uses after a preemption checkpoint (EX_TEMPFAIL from sysexits.h):
# 0 would be ambiguous ("finished") for the requeue decision.
VUTRAIN_EXIT_PREEMPTED=75

log() { echo "[vutrain-launch $(date +%H:%M:%S)] $*" >&2; }

die() {
    echo "[vutrain-launch] ERROR: $*" >&2
    exit 2
}

# is_uint VALUE: true when VALUE is a non-negative integer.
is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }

# find_repo_root: the directory holding vutrain/train.py. Under sbatch the script itself is a
# copy in slurmd's spool dir, so BASH_SOURCE cannot be trusted there: VUTRAIN_ROOT, the working
# directory (sbatch -D), the submit directory, then this file's parent.
find_repo_root() {
    local here candidate
    here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." 2>/dev/null && pwd)"
    for candidate in "${VUTRAIN_ROOT:-}" "$PWD" "${SLURM_SUBMIT_DIR:-}" "$here"; do
        if [[ -n "$candidate" && -f "$candidate/vutrain/train.py" ]]; then
            echo "$candidate"
            return 0
        fi
    done
    die "cannot find vutrain/train.py (tried VUTRAIN_ROOT='${VUTRAIN_ROOT:-}', the working dir '$PWD', SLURM_SUBMIT_DIR='${SLURM_SUBMIT_DIR:-}', '$here'). Submit from the repository root or export VUTRAIN_ROOT=/path/to/repo."
}

# refuse_hostfile_bom FILE WHAT: stop in one line when FILE (a DeepSpeed hostfile, named WHAT in the
# message) starts with a UTF-8 byte order mark, as Windows editors save it. DeepSpeed's own reader
# (open() without utf-8-sig) then takes the first host for "\ufeffnode1": the scripts' readers
# said "lists n1 n2 but the job runs on n1 n2" or "node n1 is not listed", naming no cause.
refuse_hostfile_bom() {
    [[ "$(head -c 3 -- "$1" 2>/dev/null | od -An -tx1 | tr -d ' \n')" != efbbbf ]] \
        || die "$2 starts with a UTF-8 byte order mark (saved by a Windows editor), which deepspeed reads as part of the first host name. Remove it (sed -i '1s/^\xEF\xBB\xBF//' $1) and rerun."
}

# count_gpus: GPUs visible on this node (0 when there is no NVIDIA driver). CUDA_VISIBLE_DEVICES
# first: SLURM sets it to the allocation's GPUs, and a user who narrows it inside the allocation
# means fewer (SLURM_GPUS_ON_NODE would still say all of them).
count_gpus() {
    if [[ -n "${CUDA_VISIBLE_DEVICES+x}" ]]; then
        # An empty CUDA_VISIBLE_DEVICES hides every GPU on purpose.
        visible_device_count "$CUDA_VISIBLE_DEVICES"
    elif [[ -n "${SLURM_GPUS_ON_NODE:-}" ]] && is_uint "$SLURM_GPUS_ON_NODE"; then
        echo "$SLURM_GPUS_ON_NODE"
    elif command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
    else
        echo 0
    fi
}

# visible_device_count LIST: the GPUs a CUDA_VISIBLE_DEVICES value shows. CUDA stops at the first
# entry that is neither an index nor a GPU-/MIG- UUID, so "-1" (the usual way to force a CPU run)
# and SLURM's "NoDevFiles" show none and "0,-1,1" shows one. Counting every entry made local.sh
# refuse NGPUS=2 on a CPU machine ("only 1 GPUs are visible") and place a rank on a hidden GPU.
visible_device_count() {
    local count=0 id
    local IFS=$', \t'
    for id in $1; do
        [[ -n "$id" ]] || continue
        [[ "$id" =~ ^[0-9]+$ || "$id" == GPU-* || "$id" == MIG-* ]] || break
        count=$((count + 1))
    done
    echo "$count"
}

# requested_gpus_per_node: the GPUs per node the allocation asked for (SLURM_GPUS_PER_NODE,
# "[type:]N", types summed: "a100:8" -> 8, "a100:2,v100:2" -> 4); nothing when unset or not of
# that form. An salloc shell runs on the login node, where none of the allocation's GPUs is
# visible: a hostfile written there got slots=1 on every 8-GPU node, without a word.
requested_gpus_per_node() {
    local spec="${SLURM_GPUS_PER_NODE:-}" total=0 part count
    [[ -n "$spec" ]] || return 0
    local IFS=,
    for part in $spec; do
        count="${part##*:}"
        is_uint "$count" || return 0
        total=$((total + 10#$count))
    done
    (( total > 0 )) && echo "$total"
    return 0
}

# expand_hostlist LIST: one host per line of a SLURM host list ("node[01-04,07],gpu-a1"), without
# scontrol (missing in containers, failing where no slurm.conf is found). Brackets may repeat in a
# name ("r[1-2]-n[01-02]"); a range keeps its zero padding, as SLURM names the hosts. Blanks
# between names separate them as commas do (SLURM's own reader agrees): "n[1-2] gpu3" was the
# hosts n1gpu3 and n2gpu3, since each name's blanks are dropped.
expand_hostlist() {
    local list="$1" depth=0 i char name=""
    for ((i = 0; i < ${#list}; i++)); do
        char="${list:i:1}"
        case "$char" in
            "[") depth=$((depth + 1)) ;;
            "]") depth=$((depth - 1)) ;;
        esac
        if [[ "$char" == [,[:space:]] && $depth == 0 ]]; then
            expand_hostname "$name" || return 1
            name=""
        else
            name+="$char"
        fi
    done
    (( depth == 0 )) || return 1
    expand_hostname "$name"
}

# expand_hostname NAME: the hosts of one name with bracketed ranges, "n[01-02,07]x" -> n01x n02x n07x.
expand_hostname() {
    local name="${1// /}" prefix ranges rest range low high n
    [[ -n "$name" ]] || return 0
    if [[ "$name" != *"["* ]]; then
        [[ "$name" != *"]"* ]] || return 1
        echo "$name"
        return 0
    fi
    prefix="${name%%\[*}"
    rest="${name#*\[}"
    [[ "$rest" == *"]"* ]] || return 1
    ranges="${rest%%\]*}"
    rest="${rest#*\]}"
    # An empty range ("n[]", "n[1-2,]": a list built from an empty variable) is an invalid host list
    # to SLURM; word splitting dropped it, and "n[],m1" became a hostfile of m1 alone.
    [[ -n "$ranges" && "$ranges" != ,* && "$ranges" != *, && "$ranges" != *,,* ]] || return 1
    local IFS=,
    for range in $ranges; do
        if [[ "$range" =~ ^([0-9]+)-([0-9]+)$ ]]; then
            low="${BASH_REMATCH[1]}" high="${BASH_REMATCH[2]}"
        elif is_uint "$range"; then
            low="$range" high="$range"
        else
            return 1
        fi
        (( 10#$low <= 10#$high )) || return 1
        for ((n = 10#$low; n <= 10#$high; n++)); do
            expand_hostname "$prefix$(printf '%0*d' "${#low}" "$n")$rest" || return 1
        done
    done
}

# train_script ROOT: the trainer as the launchers start it from the working directory, which stays
# the caller's (the submit dir under sbatch): relative paths in the arguments (--config my.yaml,
# output_dir=runs/x, a shard list) then mean what they mean where the user typed the command. The
# sbatch scripts used to cd to VUTRAIN_ROOT first, so a job submitted from /exp/a with
# output_dir=runs/x wrote to (and resumed from) the checkout's runs/x, shared with every other
# experiment directory that used the same relative name.
train_script() {
    if [[ "$PWD" -ef "$1" ]]; then echo vutrain/train.py; else echo "$1/vutrain/train.py"; fi
}

# job_gpu_total: the GPUs of the whole job from `--gpus=[type:]N` (SLURM_GPUS, types summed as in
# requested_gpus_per_node); nothing when unset or not of that form.
job_gpu_total() { SLURM_GPUS_PER_NODE="${SLURM_GPUS:-}" requested_gpus_per_node; }

# job_hostnames: one host per line for the current allocation, in SLURM_NODEID order, or a one-line
# error (exit 2; the caller runs it in $(...), so it must test the status) when scontrol fails or
# prints nothing (no slurm.conf, a controller down, a list it refuses with exit 0). The job went on
# with no hosts: master_addr stopped on "$1: unbound variable" and srun started the ranks with an
# empty MASTER_ADDR.
job_hostnames() {
    local list="${SLURM_JOB_NODELIST:-}" errors hosts rc=0 why
    [[ -n "$list" ]] || die "SLURM_JOB_NODELIST is not set: run this inside an allocation (sbatch/salloc) or pass a node list."
    errors="$(mktemp)" || die "cannot create a temporary file (is /tmp full?) to read scontrol's errors"
    hosts="$(scontrol show hostnames "$list" 2>"$errors")" || rc=$?
    why="$(grep -v '^[[:space:]]*$' "$errors" | tail -n 1 || true)"
    rm -f "$errors"
    hosts="$(grep -v '^[[:space:]]*$' <<<"$hosts" || true)"
    if (( rc != 0 )); then
        die "cannot list the job's nodes: 'scontrol show hostnames $list' failed (exit $rc${why:+: $why}). Make scontrol work on $(hostname) (SLURM_CONF, slurmctld reachable), then resubmit."
    fi
    [[ -n "$hosts" ]] || die "cannot list the job's nodes: 'scontrol show hostnames $list' printed none${why:+ ($why)}. Check SLURM_JOB_NODELIST and that scontrol works on $(hostname), then resubmit."
    printf '%s\n' "$hosts"
}

# node_addr NODE: the address other nodes reach NODE at (its NodeAddr, which is the
# hostname on most clusters; on the loopback test cluster every node is 127.0.0.1).
node_addr() {
    local addr
    addr="$(scontrol show node "$1" 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | head -n1 | cut -d= -f2)"
    echo "${addr:-$1}"
}

# master_addr HOST...: the rendezvous address of a job on HOST... (the first one's NodeAddr). A
# MASTER_ADDR already set (sbatch exports the submitting shell's environment) is kept, since it may
# name an interface of the first node; when it is none of the job's hosts or their NodeAddrs, a
# warning says so (a value left over from another job, e.g. localhost, hangs the rendezvous).
master_addr() {
    local first host
    # No host is a caller's bug (an empty node list); "$1: unbound variable" said nothing of it.
    (( $# > 0 )) || die "no host to take the rendezvous address (MASTER_ADDR) from: the job's node list is empty. Check SLURM_JOB_NODELIST and scontrol, then resubmit."
    first="$(node_addr "$1")"
    if [[ -z "${MASTER_ADDR:-}" ]]; then
        echo "$first"
        return 0
    fi
    for host in "$@"; do
        if [[ "$MASTER_ADDR" == "$host" || "$MASTER_ADDR" == "$(node_addr "$host")" ]]; then
            echo "$MASTER_ADDR"
            return 0
        fi
    done
    log "WARNING: MASTER_ADDR=$MASTER_ADDR from the environment names none of the job's nodes ($*; the first is at $first). A value left from another job hangs the rendezvous: unset MASTER_ADDR before sbatch unless it is an address of $1."
    echo "$MASTER_ADDR"
}

# allocation_tasks DEFAULT: the number of tasks of this start of the job. SLURM_NTASKS, unless it
# exceeds what the allocation holds (SLURM_TASKS_PER_NODE summed: "2(x3),1" -> 7): sbatch stores
# SLURM_NTASKS with the job's environment at submission, so a job requeued and resized onto fewer
# nodes (`scontrol update JobId=N NumNodes=1-1 NumTasks=1`) still reads the first start's count
# there. (SLURM_TASKS_PER_NODE alone is no answer: for `-n 3 --ntasks-per-node=2` it says 2(x2).)
# A job submitted with no task option (`sbatch -N 2`) has no SLURM_NTASKS: the allocation's sum,
# one task per node, is what a plain `srun` starts there too. DEFAULT: outside an allocation.
allocation_tasks() {
    local spec="${SLURM_TASKS_PER_NODE:-}" ntasks="${SLURM_NTASKS:-}" total=0 part count reps
    [[ -n "$spec" ]] || { echo "${ntasks:-${1:-1}}"; return 0; }
    local IFS=,
    for part in $spec; do
        if [[ "$part" =~ ^([0-9]+)\(x([0-9]+)\)$ ]]; then
            count="${BASH_REMATCH[1]}" reps="${BASH_REMATCH[2]}"
        elif is_uint "$part"; then
            count="$part" reps=1
        else
            die "cannot parse SLURM_TASKS_PER_NODE='$spec'"
        fi
        total=$((total + count * reps))
    done
    if is_uint "$ntasks" && (( ntasks <= total )); then
        echo "$ntasks"
    else
        echo "$total"
    fi
}

# default_master_port: a port derived from the job id so two jobs sharing a node do not clash
# (the same rule the trainer applies when MASTER_PORT is unset): 20000-32767, below Linux's
# ephemeral range, where an outgoing connection could hold it (`% 20000` reached 39999).
default_master_port() {
    echo $((20000 + ${SLURM_JOB_ID:-0} % 12768))
}

# The probe behind free_master_port and master_port_taken, run by "$PYTHON" (no torch import): it
# binds as the rendezvous will (every IPv4 address, SO_REUSEADDR, so a port whose last run left
# TIME_WAIT connections counts as free, as it is to torch). With a port argument it prints "taken"
# when that port cannot be bound; without, a bindable port of 20000-32767 outside the kernel's
# ephemeral range (an outgoing connection can be handed an ephemeral port between this check and
# the rendezvous's bind), drawn at random, that no other launch holds the lock of (hold_port_lock; the
# probe and it must name the same file).
LISTEN_PORT_PROBE='
import fcntl, os, random, socket, sys
def bindable(port):
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("", port))
        except OSError:
            return False
        return True
def held_by_a_launch(port):
    try:
        fd = os.open("/tmp/vutrain-port-%d.lock" % port, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False
if len(sys.argv) > 1:
    print("free" if bindable(int(sys.argv[1])) else "taken")
    sys.exit()
try:
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        low, high = (int(x) for x in f.read().split())
except (OSError, ValueError):
    low, high = 32768, 60999
ports = [p for p in range(20000, 32768) if not low <= p <= high]
start = random.SystemRandom().randrange(len(ports)) if ports else 0
candidates = ports[start:] + ports[:start]
print(next((p for p in candidates if bindable(p) and not held_by_a_launch(p)), 0))
'

# free_master_port: a port nothing listens on now, for a one-node rendezvous when MASTER_PORT is
# unset (a fixed default made a second run on the machine fail with EADDRINUSE); empty when
# "$PYTHON" cannot run the probe or every candidate is taken.
free_master_port() {
    local port
    port="$("${PYTHON:-python}" -c "$LISTEN_PORT_PROBE" 2>/dev/null)" || return 0
    if is_uint "$port" && (( port > 0 )); then echo "$port"; fi
    return 0
}

# master_port_taken PORT: true when something on this host already listens on PORT (the
# rendezvous would fail with EADDRINUSE once the ranks have started); false when it is free or the
# probe cannot tell.
master_port_taken() {
    [[ "$("${PYTHON:-python}" -c "$LISTEN_PORT_PROBE" "$1" 2>/dev/null)" == taken ]]
}

# hold_port_lock PORT: take PORT's lock for the rest of this launch (the shell and the launcher it
# starts keep the descriptor; the kernel drops the lock when they exit, however they end). False
# when another launch on this host holds it. A port is free to a probe from the draw until the
# ranks bind it seconds later: two launches in that window took the same port (1 in 12,000 for two
# draws at once, every time for one MASTER_PORT given to two), and the second run's ranks joined the
# first one's rendezvous. True, without a lock, where flock(1) or /tmp cannot serve one.
hold_port_lock() {
    local file="/tmp/vutrain-port-$1.lock"
    command -v flock >/dev/null 2>&1 || return 0
    # Created by whichever user launches first; a read-only descriptor is enough for flock, so
    # another user's file (mode 644) still works.
    [[ -e "$file" ]] || { : >>"$file"; } 2>/dev/null
    # The braces: `exec ... 2>/dev/null` alone would silence the shell's stderr for good.
    { exec {PORT_LOCK_FD}<"$file"; } 2>/dev/null || return 0
    # -w 1: another launch's probe holds a shared lock for an instant while it draws.
    flock -x -w 1 "$PORT_LOCK_FD"
}

# ranks_per_node NAME VALUE: VALUE (the variable NAME's) as a decimal count of ranks per node, or
# a one-line error. 10#: bash reads "08" as octal, an arithmetic error, and "010" as 8 ranks where
# make_hostfile.sh writes slots=10.
ranks_per_node() {
    is_uint "$2" && (( 10#$2 > 0 )) || die "$1 must be a positive integer (ranks per node), got '$2'."
    echo $((10#$2))
}

# check_master_port PORT: PORT (a MASTER_PORT given by the user) must be a TCP port number.
check_master_port() {
    if ! is_uint "$1" || (( 10#$1 < 1 || 10#$1 > 65535 )); then
        die "MASTER_PORT=$1 is not a TCP port (1-65535). Set MASTER_PORT to a free port number, or unset it to have a free one picked."
    fi
}

# check_preemption_settings: the requeue limit and the waits, read only once the job is ending,
# checked at start-up instead. VUTRAIN_MAX_RESTARTS=ten stopped the batch script with "ten: unbound
# variable" at the requeue decision, after the checkpoint: the job failed instead of coming back.
# VUTRAIN_PREEMPT_RESEND_S=ten ended the re-sender at once (sleep refused it), VUTRAIN_SRUN_WAIT=ten
# stopped srun.
check_preemption_settings() {
    local restarts="${VUTRAIN_MAX_RESTARTS:-50}" wait="${VUTRAIN_SRUN_WAIT:-300}"
    local resend="${VUTRAIN_PREEMPT_RESEND_S:-30}"
    is_uint "$restarts" || die "VUTRAIN_MAX_RESTARTS=$restarts is not a whole number of requeues. Set it to e.g. 50, or unset it."
    is_uint "$wait" || die "VUTRAIN_SRUN_WAIT=$wait is not a whole number of seconds. Set it to e.g. 300, or unset it."
    [[ "$resend" =~ ^[0-9]+(\.[0-9]+)?$ ]] \
        || die "VUTRAIN_PREEMPT_RESEND_S=$resend is not a number of seconds (0: never resend). Set it to e.g. 30, or unset it."
    # Under a second the re-sender signalled every job step in a near-tight loop (0.001: a
    # thousand scancel calls a second against slurmctld) while the ranks wrote their checkpoint.
    is_zero_seconds "$resend" || [[ "$resend" =~ ^0*[1-9] ]] \
        || die "VUTRAIN_PREEMPT_RESEND_S=$resend is under 1 second: set it to 1 or more (e.g. 30), or to 0 to never resend."
    requeue_wanted >/dev/null
}

# is_zero_seconds VALUE: true when VALUE (checked by check_preemption_settings) is zero written any
# way, "0", "00", "0.0". Only "0" turned the re-sender off: "00" or "0.0" started it with
# `sleep 0`, a loop of `scancel --signal=USR1` with no pause until the step exited.
is_zero_seconds() { [[ "$1" =~ ^0+(\.0*)?$ ]]; }

# requeue_wanted: "1" when a preempted job is to be requeued (VUTRAIN_REQUEUE unset, empty, 1, true,
# yes, on), "0" when not (0, false, no, off; any case), a one-line error otherwise. Only "0" meant
# off: VUTRAIN_REQUEUE=false or no requeued the job all the same.
requeue_wanted() {
    local value="${VUTRAIN_REQUEUE:-1}"
    case "${value,,}" in
        1 | true | yes | on) echo 1 ;;
        0 | false | no | off) echo 0 ;;
        *) die "VUTRAIN_REQUEUE=$value is neither on nor off. Set it to 0 (or false, no, off) to not requeue a preempted job, or unset it to requeue." ;;
    esac
}

# check_world_size WORLD: a WORLD_SIZE exported by the user must match what the tasks give.
check_world_size() {
    local world="$1"
    if [[ -n "${WORLD_SIZE:-}" && "$WORLD_SIZE" != "$world" ]]; then
        die "WORLD_SIZE=$WORLD_SIZE is exported but this allocation gives $world ranks ($2). Unset WORLD_SIZE or change the allocation so they agree."
    fi
}

# write_deepspeed_env FILE: the NCCL, Python and library variables every node must see, one
# KEY=VALUE per line (DeepSpeed's .deepspeed_env format; values unquoted, no newlines). A value
# holding a newline is left out with a warning naming it: the format has no way to carry one, and
# it was dropped without a word.
write_deepspeed_env() {
    local file="$1" name
    : >"$file"
    while IFS= read -r name; do
        local value="${!name}"
        if [[ "$value" == *$'\n'* ]]; then
            log "WARNING: $name holds a newline, which a .deepspeed_env line cannot carry: left out of $file, so each node's launcher keeps the $name that srun passes it (unset it or remove the newline to silence this)"
            continue
        fi
        printf '%s=%s\n' "$name" "$value" >>"$file"
    # CUDA_VISIBLE_DEVICES stays out: SLURM sets it per node, the first node's value would be
    # wrong elsewhere.
    done < <(compgen -e | grep -E '^(NCCL_|PYTHON|CUDA_|TORCH_|HF_|TRANSFORMERS_|OMP_NUM_THREADS$|FI_|UCX_|LD_LIBRARY_PATH$|PATH$|VIRTUAL_ENV$|DS_|TRITON_)' \
        | grep -v '^CUDA_VISIBLE_DEVICES$' | sort)
}

# load_deepspeed_env FILE: export every KEY=VALUE line of FILE.
load_deepspeed_env() {
    local line key
    [[ -f "$1" ]] || die "environment file $1 is missing (it is written by the batch script on the first node; is the directory on a shared file system?)"
    # The whole line, split at its first '=': `IFS='=' read key value` dropped a value's trailing
    # '=' (a base64 token), and a last line without a newline.
    while IFS= read -r line || [[ -n "$line" ]]; do
        key=${line%%=*}
        [[ -n "$key" && "$line" == *=* ]] && export "$key=${line#*=}"
    done <"$1"
}

# run_config_value KEY ARGS...: KEY of the run config that the trainer arguments ARGS
# (--config FILE k=v ...) give, the YAML included (`python -m vutrain.config --get`, no torch
# import); empty when they do not parse, which train.py then reports itself.
run_config_value() {
    local key="$1"
    shift
    # PYTHONPATH: the working directory need not be the checkout, nor vutrain installed.
    PYTHONPATH="${ROOT:-$PWD}${PYTHONPATH:+:$PYTHONPATH}" "${PYTHON:-python}" -m vutrain.config --get "$key" "$@" \
        2>/dev/null || true
}

# output_dir_from_args ARGS...: the run's output_dir (the shipped run files set it in the YAML).
output_dir_from_args() {
    run_config_value output_dir "$@"
}

# restart_resume OUT_DIR ARGS...: "train.resume=auto" when this start is a requeue of a job
# submitted with another train.resume (never, a checkpoint path) and the run has checkpoints in
# OUT_DIR: the requeued job continues its own run (never would restart it from step 0, a path
# from that checkpoint, at every requeue). Nothing otherwise, e.g. a requeue before the first
# checkpoint, where the submitted value still holds.
restart_resume() {
    local out_dir="$1" submitted ckpt
    shift
    (( ${SLURM_RESTART_COUNT:-0} > 0 )) || return 0
    submitted="$(run_config_value train.resume "$@")"  # the YAML's too, not only the command line's
    [[ -n "$submitted" && "$submitted" != auto && -n "$out_dir" ]] || return 0
    for ckpt in "$out_dir"/checkpoints/step_*; do
        if [[ -d "$ckpt" && "$ckpt" != *.tmp ]]; then
            log "restart ${SLURM_RESTART_COUNT}: train.resume=auto in place of the submitted train.resume=$submitted, to continue this job's run from its newest checkpoint"
            echo "train.resume=auto"
            return 0
        fi
    done
}

# args_with_restart_resume OUT_DIR ARGS...: sets RUN_ARGS to ARGS, with restart_resume's
# train.resume=auto in place of every train.resume override of ARGS when it gives one. Appended
# after the submitted train.resume=never, it made the trainer warn at every requeue that the key
# "is given 2 times ... remove the others if that is not the one you meant", beside restart_resume's
# own line saying what replaced what; the user can remove nothing from a requeued job.
args_with_restart_resume() {
    local out_dir="$1" resume arg value_next=0 options_end=0
    shift
    RUN_ARGS=("$@")
    resume="$(restart_resume "$out_dir" "$@")"
    [[ -n "$resume" ]] || return 0
    RUN_ARGS=()
    for arg in "$@"; do
        if (( value_next )); then
            value_next=0  # the file of --config, the number of --local_rank: never an override
        elif (( !options_end )) && [[ "$arg" == -- ]]; then
            options_end=1
        elif (( !options_end )) && takes_a_value "$arg"; then
            value_next=1
        elif [[ "$arg" =~ ^[[:space:]]*train\.resume[[:space:]]*= ]]; then
            continue
        fi
        RUN_ARGS+=("$arg")
    done
    RUN_ARGS+=("$resume")
}

# takes_a_value ARG: true for a trainer option whose value is the next argument, as
# vutrain.config reads them: --config (or an abbreviation down to --c) and --local_rank, without '='.
takes_a_value() {
    [[ "$1" != *=* ]] || return 1
    [[ "$1" == --local_rank || "$1" == --local-rank ]] && return 0
    (( ${#1} >= 3 )) && [[ "--config" == "$1"* ]]
}

# forward_preemption SIGNAL: deliver SIGUSR1 to every process of every job step (not to this
# batch shell). The trainer treats USR1 and TERM alike; USR1 is sent in both cases because the
# deepspeed launcher answers TERM by killing its ranks 30 s later, while it ignores USR1 (see
# launch/slurm/ds_node.sh).
forward_preemption() {
    log "batch script got SIG$1: forwarding SIGUSR1 to the job steps of job $SLURM_JOB_ID"
    PREEMPT_SIGNAL="$1"
    scancel --signal=USR1 "$SLURM_JOB_ID" || log "scancel --signal=USR1 $SLURM_JOB_ID failed"
    start_preemption_resender
}

# start_preemption_resender: send SIGUSR1 again every VUTRAIN_PREEMPT_RESEND_S seconds (default
# 30; 0: never) until the step exits. Under deepspeed.sbatch a rank still starting up inherits
# ds_node.sh's ignored USR1 until the trainer installs its handler: a signal that came then was
# lost, and the job ran on to its time limit without a checkpoint or a requeue. The trainer takes
# a repeated USR1 as the same request.
start_preemption_resender() {
    local every="${VUTRAIN_PREEMPT_RESEND_S:-30}"
    if [[ -n "${PREEMPT_RESENDER:-}" ]] || is_zero_seconds "$every"; then return 0; fi
    (
        trap - USR1 TERM
        while sleep "$every"; do
            log "the job steps are still running ${every} s later: sending SIGUSR1 again (a rank that was still starting up ignored it)"
            scancel --signal=USR1 "$SLURM_JOB_ID" || true
        done
    ) &
    PREEMPT_RESENDER=$!
}

# run_config_stamp OUT_DIR: OUT_DIR/config.yaml's inode and modification time (ns), empty when it
# is missing. The trainer rewrites config.yaml at every start, so a stamp that changed over a launch
# says its trainer started; comparing two stamps of one file needs no clock shared with the file
# server (a time stamp file in /tmp against an NFS mtime would).
run_config_stamp() {
    [[ -n "$1" ]] || return 0
    stat -c '%i %y' -- "$1/config.yaml" 2>/dev/null || true
}

# checked_exit_status RC OUT_DIR STAMP: RC, the launcher's exit status, unless it is 0 for a run
# that did not end: the trainer started in OUT_DIR during the launch (run_config_stamp differs from
# STAMP, taken before it) and deletes done.json and preempted.json at its start, and writes one
# of them before each exit 0 or 75. DeepSpeed's runner passes on only positive exit codes
# (`returncode > 0`): when its launch.py dies of a signal (kill -9, the OOM killer, a hang-up) it
# exits 0, and a run that died, its ranks perhaps still running orphaned, was reported as done.
# Then: 75 when preempted.json is there (the ranks checkpointed; a requeue resumes), else 1 with
# one line. LAUNCHED (optional) is 1 when the launcher's own start marker says its launch.py came up
# (local.sh's --save_pid file): a 0 with config.yaml untouched is then a launch.py killed before its
# trainer wrote it (the trainer rewrites it before any exit 0), which was reported as done. A
# launcher that never started the trainer (a stand-in, no LAUNCHED) is taken at its word.
checked_exit_status() {
    local rc="$1" out_dir="$2" stamp="$3" launched="${4:-0}"
    if [[ "$rc" != 0 || -z "$out_dir" ]]; then
        echo "$rc"
    elif [[ "$(run_config_stamp "$out_dir")" == "$stamp" ]]; then
        if [[ "$launched" != 1 ]]; then
            echo "$rc"
            return 0
        fi
        log "ERROR: the launcher exited 0, but its launch.py died before the trainer started in $out_dir (config.yaml was not rewritten): deepspeed's runner reports a launch.py killed by a signal (kill -9, the OOM killer) as success. Nothing was trained; rerun the same command."
        echo 1
    elif [[ -e "$out_dir/done.json" ]]; then
        echo 0
    elif [[ -e "$out_dir/preempted.json" ]]; then
        log "the launcher exited 0, but the run in $out_dir left preempted.json (a launcher process died of a signal; deepspeed's runner reports that as success): exiting $VUTRAIN_EXIT_PREEMPTED, as for a preemption"
        echo "$VUTRAIN_EXIT_PREEMPTED"
    else
        log "ERROR: the launcher exited 0, but the run in $out_dir started and left neither done.json nor preempted.json: a launcher process died (deepspeed's runner reports a launch.py killed by a signal, kill -9 or the OOM killer, as success), or the trainer could not write done.json (see its warning). Check that none of its ranks still runs, then rerun the same command: it resumes from the newest checkpoint."
        echo 1
    fi
}

# children_of PID...: the processes whose parent is one of PID... (from /proc, since pgrep is
# missing where procps is, e.g. slim containers)
children_of() {
    local stat line fields
    for stat in /proc/[0-9]*/stat; do
        { read -r line <"$stat"; } 2>/dev/null || continue  # gone meanwhile
        # "pid (comm) state ppid ...": comm may hold spaces, so split after its closing parenthesis
        read -ra fields <<<"${line##*) }"
        if [[ " $* " == *" ${fields[1]} "* ]]; then echo "${line%% *}"; fi
    done
}

# process_running PID: true while PID runs (false once it exited, also as an unreaped zombie, which
# kill -0 still finds).
process_running() {
    local line
    { read -r line <"/proc/$1/stat"; } 2>/dev/null || return 1
    line="${line##*) }"
    [[ "${line:0:1}" != Z ]]
}

# runner_started_launch_py RUNNER: true when a child of RUNNER runs DeepSpeed's launch.py (what a
# real runner starts on its own node, local.sh's or ds_node.sh's; a stand-in launcher never does). The kernel's children list of the
# runner where it has one, else the /proc scan.
runner_started_launch_py() {
    local kids child
    kids="$(cat "/proc/$1/task/$1/children" 2>/dev/null)" || kids="$(children_of "$1")"
    for child in $kids; do
        grep -qzxF deepspeed.launcher.launch "/proc/$child/cmdline" 2>/dev/null && return 0
    done
    return 1
}

# runner_is_deepspeed RUNNER: true when RUNNER runs DeepSpeed's own runner, as the launchers exec it
# ("$PYTHON" -u -m deepspeed.launcher.runner ...), not a stand-in launcher (a script given as
# PYTHON: its interpreter's command line names the script first).
runner_is_deepspeed() {
    local args=()
    { mapfile -d '' -t args <"/proc/$1/cmdline"; } 2>/dev/null || return 1
    [[ "${args[1]:-} ${args[2]:-} ${args[3]:-}" == "-u -m deepspeed.launcher.runner" ]]
}

# wait_for_runner PID: wait until the runner PID (a child of this shell) has exited, however often
# a trapped signal interrupts `wait` (it returns early, status > 128, for each). Polls every 0.1 s
# until the runner has started its launch.py or is seen to be DeepSpeed's runner: a launch.py killed
# while it still imports DeepSpeed (seconds, before it writes its --save_pid file and before any
# rank) makes the runner exit 0, and only this tells that from a launcher that never starts one.
# DeepSpeed's runner (the launchers pass it no --autotuning) exits 0 only once the launch.py it
# started ended: a launch.py killed within a poll of its start (the OOM killer) was never seen among
# its children, and the run counted as done. Sets RUNNER_RC (its exit status) and LAUNCH_PY_SEEN
# (1 once launch.py was seen, or when DeepSpeed's runner exited 0).
wait_for_runner() {
    local deepspeed_runner=0
    LAUNCH_PY_SEEN=0
    while process_running "$1"; do
        if (( LAUNCH_PY_SEEN == 0 && deepspeed_runner == 0 )); then
            if runner_started_launch_py "$1"; then
                LAUNCH_PY_SEEN=1
            elif runner_is_deepspeed "$1"; then
                deepspeed_runner=1
            else
                sleep 0.1
            fi
            continue
        fi
        wait "$1" || true
    done
    RUNNER_RC=0
    wait "$1" || RUNNER_RC=$?
    if (( RUNNER_RC == 0 && deepspeed_runner == 1 )); then LAUNCH_PY_SEEN=1; fi
}

# clear_launch_pid_file PID: remove /tmp/PID.deepspeed before the runner that will have pid PID
# starts (called in the subshell that then execs it, so no launch can race it), or stop in one line
# naming it and its owner. DeepSpeed's launch.py, given --save_pid, refuses to start while that file
# exists ("AssertionError: pid file exists but shouldn't"), and a stale one is left by a launch.py
# killed after it came up whose pid is now reused. Another user's, in sticky /tmp, cannot be removed:
# the run stopped with launch.py's traceback and no line of the launcher's own.
clear_launch_pid_file() {
    local file="/tmp/$1.deepspeed" owner
    rm -f "$file" 2>/dev/null || true
    [[ -e "$file" ]] || return 0
    owner="$(stat -c %U -- "$file" 2>/dev/null || echo "another user")"
    die "$file, a stale DeepSpeed pid file owned by $owner, cannot be removed and DeepSpeed's launch.py refuses to start while it exists (its runner would have pid $1). Rerun (the runner then gets another pid), and have $owner or root remove it: rm $file"
}

# launch_py_came_up FILE: 1 (and FILE removed) when DeepSpeed's launch.py, given --save_pid, left
# FILE (/tmp/<runner pid>.deepspeed: written as it comes up, before any rank starts, and removed
# only when it handles a signal itself), else 0.
launch_py_came_up() {
    [[ -e "$1" ]] || { echo 0; return 0; }
    rm -f "$1" 2>/dev/null || true
    echo 1
}

# launch_processes TAG: the pids of this user's processes whose environment holds
# VUTRAIN_LAUNCH_ID=TAG (a launcher given it passes it to launch.py, the ranks and their workers),
# one per line. The environment, not a process group: the launcher shares the caller's group (a
# Ctrl-C must reach it), and so does whatever else the caller runs there (`local.sh ... | tee log`).
launch_processes() {
    local file
    [[ -n "$1" ]] || return 0
    # One grep over every environ file; others' processes are unreadable and left out.
    grep -lzxF -- "VUTRAIN_LAUNCH_ID=$1" /proc/[0-9]*/environ 2>/dev/null | while IFS= read -r file; do
        file="${file#/proc/}"
        echo "${file%/environ}"
    done
}

# parent_pid PID: PID's parent (empty when it is gone).
parent_pid() {
    local line fields
    { read -r line <"/proc/$1/stat"; } 2>/dev/null || return 0
    # "pid (comm) state ppid ...": comm may hold spaces, so split after its closing parenthesis
    read -ra fields <<<"${line##*) }"
    echo "${fields[1]}"
}

# leftover_cause PID...: why the top processes PID... of a launch outlived its launcher. A launch.py
# among them is alive: the runner died of a signal before it (a SIGTERM to the whole process group,
# as scancel or a supervisor sends, kills the runner at once while launch.py stops its ranks, or
# the runner alone was killed); the message said "their launch.py died" then.
leftover_cause() {
    local pid
    for pid in "$@"; do
        if grep -qzxF deepspeed.launcher.launch "/proc/$pid/cmdline" 2>/dev/null; then
            echo "the runner died of a signal while its launch.py, pid $pid, is still running, stopping its ranks if it got the signal too"
            return 0
        fi
    done
    echo "their launch.py died"
}

# stop_launch_leftovers TAG WAIT: stop the processes of a launch (launch_processes TAG) that outlive
# its launcher; true when there were any. DeepSpeed's launch.py killed by a signal (kill -9, the OOM
# killer) leaves its ranks training on, orphaned, after the runner returned: they were reported and
# left running, holding the GPUs and writing into the run directory that the next launch resumes.
# SIGTERM goes to the top ones (a rank checkpoints and exits 75, as for a preemption; a launch.py
# passes it to its ranks); what still runs WAIT seconds later gets SIGKILL.
stop_launch_leftovers() {
    local tag="$1" wait="$2" pids pid tops=() waited=0
    pids="$(launch_processes "$tag")"
    [[ -n "$pids" ]] || return 1
    for pid in $pids; do
        [[ $'\n'"$pids"$'\n' == *$'\n'"$(parent_pid "$pid")"$'\n'* ]] || tops+=("$pid")
    done
    log "WARNING: processes of this launch outlived its launcher (pids ${tops[*]}; $(leftover_cause "${tops[@]}")): sending them SIGTERM (a rank checkpoints and exits), SIGKILL after ${wait} s"
    kill -TERM "${tops[@]}" 2>/dev/null || true
    while [[ -n "$(launch_processes "$tag")" ]] && (( waited < wait )); do
        sleep 1
        waited=$((waited + 1))
    done
    pids="$(launch_processes "$tag")"
    if [[ -n "$pids" ]]; then
        log "WARNING: still running after ${wait} s: sending SIGKILL to $(paste -sd' ' - <<<"$pids")"
        # shellcheck disable=SC2086  # one pid per word
        kill -KILL $pids 2>/dev/null || true
    fi
    return 0
}

# run_preemptible OUTPUT_DIR CMD...: run CMD (an srun line) in the background, forward USR1/TERM
# to it, wait, then decide: exit code 75 (or a fresh preempted.json after a signal) requeues
# the job with `scontrol requeue` unless VUTRAIN_REQUEUE is off (requeue_wanted); an exit 0 of a
# run that left no end marker is corrected first (checked_exit_status); anything else is returned.
run_preemptible() {
    local out_dir="$1" pid rc stamp
    shift
    PREEMPT_SIGNAL=""
    PREEMPT_RESENDER=""
    local marker
    marker="$(mktemp)"   # time stamp: a preempted.json newer than this was written by this run
    stamp="$(run_config_stamp "$out_dir")"
    trap 'forward_preemption USR1' USR1
    trap 'forward_preemption TERM' TERM
    "$@" &
    pid=$!
    # wait returns early (status > 128) whenever a trapped signal arrives; keep waiting until
    # the step has really exited, then collect its status (bash keeps it for reaped children).
    while kill -0 "$pid" 2>/dev/null; do
        wait "$pid"
    done
    wait "$pid"
    rc=$?
    trap - USR1 TERM
    if [[ -n "${PREEMPT_RESENDER:-}" ]]; then
        kill "$PREEMPT_RESENDER" 2>/dev/null
        wait "$PREEMPT_RESENDER" 2>/dev/null
        PREEMPT_RESENDER=""
    fi
    log "training step exited with code $rc${PREEMPT_SIGNAL:+ after SIG$PREEMPT_SIGNAL}"
    rc="$(checked_exit_status "$rc" "$out_dir" "$stamp")"
    local preempted=0
    if [[ "$rc" == "$VUTRAIN_EXIT_PREEMPTED" ]]; then
        preempted=1
    elif [[ "$rc" != 0 && -n "$PREEMPT_SIGNAL" ]]; then
        # A signal arrived and the step failed: the deepspeed launcher reports 1 when it was sent
        # TERM itself even though the ranks checkpointed, and a rank signalled before it
        # installed its handlers dies. The job is out of time either way; requeue and resume from
        # the newest checkpoint rather than fail.
        preempted=1
        if [[ -n "$out_dir" && "$out_dir/preempted.json" -nt "$marker" ]]; then
            log "step exited $rc after SIG$PREEMPT_SIGNAL but the ranks wrote $out_dir/preempted.json"
        else
            log "WARNING: step exited $rc after SIG$PREEMPT_SIGNAL without a preemption checkpoint; the next run resumes from the newest periodic checkpoint"
        fi
    fi
    rm -f "$marker"
    if [[ "$preempted" == 1 ]]; then
        if [[ "$(requeue_wanted)" == 0 ]]; then
            log "preempted; VUTRAIN_REQUEUE=${VUTRAIN_REQUEUE} so not requeueing (resume with the same command)"
            return "$VUTRAIN_EXIT_PREEMPTED"
        fi
        # `scancel JOB` (and the time limit) TERM every step while the job is already COMPLETING:
        # the ranks still checkpoint, but a requeue would undo the user's cancel. Only a job
        # that is still RUNNING (USR1 before the limit, preemption signal) is requeued.
        local state
        state="$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | grep -o 'JobState=[A-Z_]*' | cut -d= -f2)"
        if [[ "$state" != RUNNING ]]; then
            log "checkpoint written, but job $SLURM_JOB_ID is ${state:-gone} (cancelled or out of time); not requeueing. Resubmit the same command to resume."
            return "$VUTRAIN_EXIT_PREEMPTED"
        fi
        # :-0 in the line too: SLURM sets SLURM_RESTART_COUNT only once the job restarted, and
        # VUTRAIN_MAX_RESTARTS=0 stopped a first start here on "unbound variable" (exit 1, not 75).
        if (( ${SLURM_RESTART_COUNT:-0} >= 10#${VUTRAIN_MAX_RESTARTS:-50} )); then
            log "preempted, but the job already restarted ${SLURM_RESTART_COUNT:-0} times (VUTRAIN_MAX_RESTARTS=${VUTRAIN_MAX_RESTARTS:-50}); not requeueing. Resubmit the same command to resume."
            return "$VUTRAIN_EXIT_PREEMPTED"
        fi
        log "preempted: checkpoint written; requeueing job $SLURM_JOB_ID (restart count ${SLURM_RESTART_COUNT:-0})"
        scontrol requeue "$SLURM_JOB_ID" || die "scontrol requeue $SLURM_JOB_ID failed; resubmit the same command by hand, it resumes from $out_dir/checkpoints"
        return 0
    fi
    return "$rc"
}
