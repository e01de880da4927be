#!/bin/bash
# Write a DeepSpeed hostfile: one "HOST slots=N" line per node.
#
#   launch/make_hostfile.sh [-s SLOTS] [-o FILE] [NODELIST]
#
# NODELIST: a SLURM node list (e.g. "gpu[01-04]") or comma-separated hosts; default
# $SLURM_JOB_NODELIST. Range syntax is expanded with `scontrol show hostnames`; a plain list needs no SLURM.
# SLOTS: ranks per node; default the GPUs visible here (SLURM_GPUS_ON_NODE, CUDA_VISIBLE_DEVICES,
# nvidia-smi), or 1 CPU rank when there is no GPU. Writes to FILE or stdout.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() { sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

slots="" out=""
while getopts "s:o:h" opt; do
    case "$opt" in
        s) slots="$OPTARG" ;;
        o) out="$OPTARG" ;;
        h) usage; exit 0 ;;
        *) usage >&2; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
# Hosts as separate arguments ("-s 8 gpu01 gpu02") wrote a hostfile of gpu01 alone.
given="$*"
(( $# <= 1 )) || die "one node list, comma-separated: got $# arguments ($given); pass '${given// /,}' (or SLURM's 'gpu[01-04]')."
nodelist="${1:-${SLURM_JOB_NODELIST:-}}"
[[ -n "$nodelist" ]] || die "no node list: pass one (e.g. 'gpu[01-04]' or 'a,b') or run inside a SLURM allocation."

if [[ -z "$slots" ]]; then
    slots="$(count_gpus)"
    (( slots > 0 )) || slots=1
fi
is_uint "$slots" && (( slots > 0 )) || die "slots must be a positive integer, got '$slots'."

if [[ "$nodelist" != *[\[\]]* ]]; then
    # A plain comma list needs no scontrol (which fails where it finds no SLURM configuration).
    # Commas or blanks: "n1 n2" was one host "n1n2".
    hosts="$(tr ', \t' '\n\n\n' <<<"$nodelist")"
elif command -v scontrol >/dev/null 2>&1; then
    hosts="$(scontrol show hostnames "$nodelist")" || die "scontrol could not expand node list '$nodelist'."
else
    die "node list '$nodelist' uses SLURM range syntax but scontrol is not installed; pass comma-separated hosts."
fi
# Empty entries ("a,,b", a trailing comma) are dropped; the loop's status is not the script's.
lines="$(while IFS= read -r h; do
    h="${h// /}"
    if [[ -n "$h" ]]; then echo "$h slots=$slots"; fi
done <<<"$hosts")"
[[ -n "$lines" ]] || die "node list '$nodelist' expanded to no hosts."
if [[ -n "$out" ]]; then
    mkdir -p "$(dirname "$out")"
    printf '%s\n' "$lines" >"$out"
else
    printf '%s\n' "$lines"
fi
