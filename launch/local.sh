#!/bin/bash
# One node through the deepspeed launcher: NGPUS GPU ranks, or CPU ranks when there is no GPU.
#
#   NGPUS=8 launch/local.sh --config vutrain/configs/vit-b-32.yaml output_dir=runs/b32 [key=value ...]
#   NGPUS=2 launch/local.sh --config vutrain/configs/tiny.yaml        # no GPU: 2 CPU ranks (gloo)
#
# Environment: NGPUS (ranks; default all visible GPUs, or 1 CPU rank without GPU),
# MASTER_PORT (default 29500), HOSTFILE (optional: a one-host DeepSpeed hostfile to use instead
# of NGPUS; it must exist), PYTHON (default python).
# Ctrl-C / SIGTERM reach the launcher, which stops the ranks; SIGUSR1 to a rank checkpoints it
# and the run exits 75 (resume with the same command: train.resume=auto is the default).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[[ -f "$ROOT/vutrain/train.py" ]] || die "$ROOT/vutrain/train.py not found; run launch/local.sh from a checkout of the repository."
cd "$ROOT"

PY="${PYTHON:-python}"
PORT="${MASTER_PORT:-29500}"
GPUS="$(count_gpus)"
launcher=("$PY" -u -m deepspeed.launcher.runner --master_port "$PORT")

if [[ -n "${HOSTFILE:-}" ]]; then
    [[ -f "$HOSTFILE" ]] || die "HOSTFILE=$HOSTFILE does not exist. Create it with launch/make_hostfile.sh -s N localhost, or unset HOSTFILE and set NGPUS."
    nhosts="$(awk 'NF && $1 !~ /^#/' "$HOSTFILE" | wc -l)"
    (( nhosts == 1 )) || die "HOSTFILE=$HOSTFILE lists $nhosts hosts; local.sh runs one node. Use launch/slurm/deepspeed.sbatch for several nodes."
    [[ -z "${NGPUS:-}" ]] || die "set either HOSTFILE or NGPUS, not both."
    # A one-host hostfile never needs ssh, but the launcher asks for a master address then.
    launcher+=(--hostfile "$HOSTFILE" --master_addr 127.0.0.1)
    log "hostfile $HOSTFILE: $(cat "$HOSTFILE")"
else
    if [[ -z "${NGPUS:-}" ]]; then
        NGPUS=$(( GPUS > 0 ? GPUS : 1 ))
    fi
    is_uint "$NGPUS" && (( NGPUS > 0 )) || die "NGPUS must be a positive integer, got '$NGPUS'."
    if (( GPUS > 0 && NGPUS > GPUS )); then
        die "NGPUS=$NGPUS but only $GPUS GPUs are visible; set NGPUS<=$GPUS."
    fi
    check_world_size "$NGPUS" "NGPUS=$NGPUS"
    if (( GPUS == 0 )); then
        log "no GPU visible: $NGPUS CPU rank(s) with gloo"
        # A missing hostfile plus --num_gpus makes the launcher start NGPUS local ranks even
        # on the CPU accelerator; a stale /job/hostfile (its default) must not be picked up.
        launcher+=(--hostfile /dev/null/none)
    fi
    launcher+=(--num_gpus "$NGPUS")
fi
exec "${launcher[@]}" vutrain/train.py "$@"
