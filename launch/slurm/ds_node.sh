#!/bin/bash
# One DeepSpeed launcher on this node (started once per node by deepspeed.sbatch via srun).
#
#   ds_node.sh HOSTFILE ENV_FILE TRAINER_ARGS...
#
# Finds this node's rank from its position in HOSTFILE (SLURMD_NODENAME), exports ENV_FILE
# (the .deepspeed_env written on the first node), and runs
#   deepspeed --hostfile HOSTFILE --no_ssh --node_rank R --master_addr A --master_port P vutrain/train.py ...
# --no_ssh: each node starts its own ranks; no ssh/pdsh between nodes is needed. DeepSpeed reads
# .deepspeed_env only when it fans out over ssh itself, so the file is loaded here instead.
# Exit status: the runner's, except a 0 that hides a launch.py killed by a signal (see the end):
# ranks it left running get SIGTERM (they checkpoint), SIGKILL VUTRAIN_LEFTOVER_WAIT s later (300);
# 1 with one line for a launch.py killed while it imported DeepSpeed (this node started no rank);
# 2 with one line for a stale /tmp/<runner pid>.deepspeed that cannot be removed.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

(( $# >= 2 )) || die "usage: ds_node.sh HOSTFILE ENV_FILE TRAINER_ARGS..."
hostfile="$1" env_file="$2"
shift 2
[[ -f "$hostfile" ]] || die "hostfile $hostfile does not exist on $(hostname) (is it on a shared file system?)"
refuse_hostfile_bom "$hostfile" "hostfile $hostfile"
load_deepspeed_env "$env_file"
# A VUTRAIN_LAUNCH_DIR without %j is one directory for every job: a job starting at the same
# time rewrites the hostfile and env file under this one's feet.
shared_dir_hint="if VUTRAIN_LAUNCH_DIR is set, jobs running at once share it: give each job its own with %j, e.g. VUTRAIN_LAUNCH_DIR=/shared/scratch/vutrain-launch/%j"
if [[ -n "${VUTRAIN_LAUNCH_JOB:-}" && -n "${SLURM_JOB_ID:-}" && "$VUTRAIN_LAUNCH_JOB" != "$SLURM_JOB_ID" ]]; then
    die "$env_file was written by job $VUTRAIN_LAUNCH_JOB, not by this job $SLURM_JOB_ID; $shared_dir_hint"
fi

me="${SLURMD_NODENAME:-$(hostname -s)}"
node_rank=""
i=0
# `|| [[ -n $host ]]`: a last line without its newline (an editor's, printf's) is a host too
while read -r host _ || [[ -n "$host" ]]; do
    # A blank line with a Windows line end is "\r": counted as a host, it moved the next nodes' ranks
    # off DeepSpeed's (which skips it).
    host="${host%$'\r'}"
    [[ -z "$host" || "$host" == \#* ]] && continue
    [[ "$host" == "$me" ]] && node_rank=$i
    i=$((i + 1))
done <"$hostfile"
node_count=$i
[[ -n "$node_rank" ]] || die "node $me is not listed in $hostfile ($shared_dir_hint)"
: "${MASTER_ADDR:?MASTER_ADDR must be exported by the batch script}"
: "${MASTER_PORT:?MASTER_PORT must be exported by the batch script}"

# The launcher renumbers this node's GPUs 0..slots-1 (it overwrites CUDA_VISIBLE_DEVICES). If
# SLURM handed out other physical GPUs (a shared node), those would be the wrong ones.
if [[ -n "${CUDA_VISIBLE_DEVICES:-}" && "$CUDA_VISIBLE_DEVICES" =~ ^[0-9,]+$ ]]; then
    # sub(/\r$/): a hostfile with Windows line ends (DeepSpeed reads it) gave slots "N\r".
    slots="$(awk -v h="$me" '{sub(/\r$/, "")} $1 == h {sub("slots=", "", $2); print $2}' "$hostfile")"
    # 10#: "slots=08" is 8 GPUs; as octal it was an arithmetic error and a refusal naming no GPUs.
    is_uint "$slots" || die "node $me: $hostfile gives it slots '$slots'; every line must read 'HOST slots=N' with N a positive integer."
    # More slots than GPUs is no shared node: "request whole nodes" sent the user the wrong way.
    visible="$(visible_device_count "$CUDA_VISIBLE_DEVICES")"
    (( 10#$slots <= visible )) || die "node $me: $hostfile gives it slots=$slots but SLURM gave it $visible GPUs (CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES): set slots=$visible in the hostfile, or submit with --gpus-per-node=$((10#$slots))."
    expected="$(seq -s, 0 $((10#$slots - 1)))"
    [[ "$CUDA_VISIBLE_DEVICES" == "$expected" ]] || die "node $me: SLURM gave GPUs CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES but the deepspeed launcher would use $expected. Request whole nodes (sbatch --exclusive) or use launch/slurm/srun.sbatch."
fi

LEFTOVER_WAIT="${VUTRAIN_LEFTOVER_WAIT:-300}"
is_uint "$LEFTOVER_WAIT" || die "VUTRAIN_LEFTOVER_WAIT=$LEFTOVER_WAIT is not a whole number of seconds. Set it to e.g. 300, or unset it."
# Taken before the launcher starts: a config.yaml the trainer rewrote since says it started.
OUT_DIR="$(output_dir_from_args "$@")"
RUN_STAMP="$(run_config_stamp "$OUT_DIR")"

# SLURM signals every process of the step. Ignoring USR1 here is inherited by the deepspeed
# launcher processes (Python keeps an inherited SIG_IGN), so they survive it, while the
# trainer installs its own handler and checkpoints. TERM cannot be shielded this way: the
# launcher installs its own TERM handler (kills the ranks after 30 s), see common.sh.
trap '' USR1
# The runner is not exec'd: DeepSpeed's runner exits 0 when its launch.py dies of a signal (kill -9,
# the OOM killer), and the ranks it had started trained on, orphaned, outside what the step's
# teardown finds by process tree (proctrack/linuxproc), while the job was reported COMPLETED.
# VUTRAIN_LAUNCH_ID marks every process of this node's launch (stop_launch_leftovers finds them by
# it); --save_pid makes launch.py leave /tmp/<runner pid>.deepspeed, the sign that it came up.
# The subshell clears a stale --save_pid file of its own pid, the runner's once it execs
# (clear_launch_pid_file: exit 2 with one line when it cannot).
LAUNCH_ID="$$-$(date +%s%N)-$RANDOM"
train_py="$(train_script "$ROOT")"
(
    clear_launch_pid_file "$BASHPID"
    export VUTRAIN_LAUNCH_ID="$LAUNCH_ID"
    exec "${PYTHON:-python}" -u -m deepspeed.launcher.runner \
        --hostfile "$hostfile" --no_ssh --node_rank "$node_rank" \
        --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --save_pid \
        "$train_py" "$@"
) &
runner_pid=$!
LAUNCH_PID_FILE="/tmp/$runner_pid.deepspeed"
# SLURM's TERM (scancel, the time limit) reaches the runner, launch.py and the ranks directly; this
# shell, the step's task, waits on, so the step is not torn down while the ranks checkpoint.
trap ':' TERM
wait_for_runner "$runner_pid"
runner_rc="$RUNNER_RC"
trap '' TERM
launched="$(launch_py_came_up "$LAUNCH_PID_FILE")"
leftovers=0
stop_launch_leftovers "$LAUNCH_ID" "$LEFTOVER_WAIT" && leftovers=1
# A launch.py seen running (or DeepSpeed's runner's exit 0, which it reaches only once its launch.py
# ended: wait_for_runner) that exited before writing its --save_pid file (which it leaves on every
# exit 0 of its own) was killed while it imported DeepSpeed: the runner's 0 hides a node that
# started no rank. On any node, the only one included; elsewhere the other nodes then waited at the
# rendezvous until srun ended them, a failed job that no line explained.
if [[ "$runner_rc" == 0 && "$launched" == 0 ]] && (( LAUNCH_PY_SEEN == 1 )); then
    others=""
    (( node_count == 1 )) || others=", and the job's other nodes wait at the rendezvous until srun ends them"
    log "ERROR: node $me: the launcher exited 0, but its launch.py died before it came up (no $LAUNCH_PID_FILE; killed by a signal, kill -9 or the OOM killer, while it imported DeepSpeed): this node started no rank$others. Resubmit the same command; it resumes from the newest checkpoint."
    exit 1
fi
# The runner's 0 is checked against the run directory where this node can judge it: on the only
# node (its ranks wrote their end marker before exiting), or when its ranks outlived launch.py (it
# died of a signal). Another node's 0 is left to deepspeed.sbatch, which checks once every node ended.
if [[ "$runner_rc" == 0 ]] && (( node_count == 1 || leftovers == 1 )); then
    exit "$(checked_exit_status "$runner_rc" "$OUT_DIR" "$RUN_STAMP" "$launched")"
fi
exit "$runner_rc"
