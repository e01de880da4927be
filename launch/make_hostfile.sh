#!/bin/bash
# Write a DeepSpeed hostfile: one "HOST slots=N" line per node.
#
#   launch/make_hostfile.sh [-s SLOTS] [-o FILE] [NODELIST]
#
# NODELIST: a SLURM node list (e.g. "node[01-04,07],gpu-a1") or comma-separated hosts; default
# $SLURM_JOB_NODELIST. Ranges are expanded by `scontrol show hostnames`, or here where it is missing.
# SLOTS: ranks per node; default the GPUs visible here (CUDA_VISIBLE_DEVICES, SLURM_GPUS_ON_NODE),
# else the allocation's SLURM_GPUS_PER_NODE (an salloc shell on a login node), else nvidia-smi's
# count, or 1 CPU rank when there is no GPU. Writes to FILE or stdout.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# The header comment, up to the first line of code (a fixed line range printed `set -euo pipefail`).
usage() { awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "${BASH_SOURCE[0]}"; }

slots="" out="" slots_given=""
while getopts "s:o:h" opt; do
    case "$opt" in
        s) slots="$OPTARG" slots_given=1 ;;
        # `-o "$HF"` of an unset variable printed the hostfile to stdout and wrote no file.
        o) [[ -n "$OPTARG" ]] || die "-o needs a file name (got an empty one): pass -o FILE, or leave -o out to print the hostfile."
           out="$OPTARG" ;;
        h) usage; exit 0 ;;
        *) usage >&2; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
# Hosts as separate arguments ("-s 8 gpu01 gpu02") wrote a hostfile of gpu01 alone.
given="$*"
(( $# <= 1 )) || die "one node list, comma-separated: got $# arguments ($given); pass '${given// /,}' (or SLURM's 'gpu[01-04]')."
nodelist="${1:-${SLURM_JOB_NODELIST:-}}"
# A list read from a file a Windows editor saved ("$(cat nodes.txt)") starts with a UTF-8 byte order
# mark: it was written into the hostfile as part of the first host, which deepspeed then reads as
# "\ufeffn1", a node of no job.
nodelist="${nodelist#$'\xef\xbb\xbf'}"
[[ -n "$nodelist" ]] || die "no node list: pass one (e.g. 'gpu[01-04]' or 'a,b') or run inside a SLURM allocation."

# default_slots: GPUs visible on this node of the allocation; in an salloc shell on a login node
# (no CUDA_VISIBLE_DEVICES, no SLURM_GPUS_ON_NODE) the GPUs per node the allocation asked for,
# not the login node's own.
default_slots() {
    local gpus=""
    if [[ -z "${CUDA_VISIBLE_DEVICES+x}" && -z "${SLURM_GPUS_ON_NODE:-}" ]]; then
        gpus="$(requested_gpus_per_node)"
    fi
    [[ -n "$gpus" ]] || gpus="$(count_gpus)"
    echo $((gpus > 0 ? gpus : 1))
}

# check_default_slots_cover_the_job: the default slots are one node's GPUs (or what was asked per
# node); a job given `--gpus=12` over 2 nodes may hold 8 and 4, and every line said slots=8. Only
# for the job's own node list, whose GPU total SLURM_GPUS is.
check_default_slots_cover_the_job() {
    local total nhosts
    [[ -z "$slots_given" && "$nodelist" == "${SLURM_JOB_NODELIST:-}" ]] || return 0
    total="$(job_gpu_total)"
    nhosts="$(wc -l <<<"$lines")"
    [[ -z "$total" ]] || (( total == slots * nhosts )) \
        || die "the job holds $total GPUs (SLURM_GPUS=$SLURM_GPUS) but $slots per node x $nhosts nodes = $((slots * nhosts)): pass -s N (the ranks of every node, at most the fewest GPUs a node holds), or submit with --gpus-per-node=N instead of --gpus."
}

# slots_given, not an empty $slots: `-s ""` (`-s "$GPUS"` of an unset variable) wrote the default
# slots without a word, e.g. slots=1 on a login node, and the job ran one rank per node.
[[ -n "$slots_given" ]] || slots="$(default_slots)"
# 10#: bash arithmetic reads a leading zero as octal ("-s 08" printed "value too great for base"
# and was refused as not a positive integer), as local.sh reads NGPUS and a hostfile's slots.
is_uint "$slots" && (( 10#$slots > 0 )) || die "slots must be a positive integer, got '$slots': pass -s N (the ranks per node), or leave -s out for this node's GPUs."
slots=$((10#$slots))

# A SLURM_CONF that names no file made scontrol retry it for 60 s before the fallback below.
usable_scontrol() {
    command -v scontrol >/dev/null 2>&1 || return 1
    [[ -z "${SLURM_CONF:-}" || -f "$SLURM_CONF" ]] && return 0
    log "WARNING: SLURM_CONF=$SLURM_CONF is no file; expanding '$nodelist' without scontrol (fix or unset SLURM_CONF)."
    return 1
}

if [[ "$nodelist" != *[\[\]]* ]]; then
    # A plain comma list needs no scontrol (which fails where it finds no SLURM configuration).
    # Commas or blanks: "n1 n2" was one host "n1n2". \r too (a list read from a file with Windows line
    # ends): "n1\r slots=N" matched no node of the job where deepspeed.sbatch checks a HOSTFILE.
    hosts="$(tr ', \t\r' '\n\n\n\n' <<<"$nodelist")"
elif usable_scontrol && hosts="$(scontrol show hostnames "$nodelist" 2>/dev/null)" \
    && [[ -n "$hosts" ]]; then
    # Empty output is scontrol's refusal ("Invalid hostlist", yet exit 0): the fallback below
    # refuses the list too, with a line that shows the form.
    :
else
    # No scontrol (a container) or none that finds a slurm.conf (a workstation, a login node of
    # another cluster): the README's 'gpu[01-04]' failed there.
    hosts="$(expand_hostlist "$nodelist")" \
        || die "cannot expand node list '$nodelist': write ranges as SLURM does (e.g. 'gpu[01-04,07],cpu1') or pass comma-separated hosts."
fi
# Empty entries ("a,,b", a trailing comma) are dropped; the loop's status is not the script's.
lines="$(while IFS= read -r h; do
    h="${h// /}"
    if [[ -n "$h" ]]; then echo "$h slots=$slots"; fi
done <<<"$hosts")"
[[ -n "$lines" ]] || die "node list '$nodelist' expanded to no hosts."
# A node named twice ("gpu01,gpu01", "n[1-2],n2") was written on two lines, and every deepspeed
# launcher given the file stopped with a ValueError traceback ("multiple entries for gpu01").
repeated="$(cut -d' ' -f1 <<<"$lines" | sort | uniq -d | paste -sd, -)"
[[ -z "$repeated" ]] || die "node list '$nodelist' names $repeated more than once: list each node once (its ranks are the slots, -s N)."
check_default_slots_cover_the_job
if [[ -n "$out" ]]; then
    mkdir -p "$(dirname "$out")"
    printf '%s\n' "$lines" >"$out"
else
    printf '%s\n' "$lines"
fi
