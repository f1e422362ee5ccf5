#!/usr/bin/env bash
# Queue K consecutive training jobs that resume from one JOB_DIR, each starting after the
# previous one ended (--dependency=afterany:<prev>), e.g. to cover a long run with jobs that
# each fit the partition's time limit.
#
#   JOB_DIR=/shared/runs/exp1 slurm/chain.sh 5 -N 2 --gpus-per-node 8 -t 04:00:00
#
# Arguments after K go to every sbatch call. The environment (CONFIG, JOB_DIR, TRAIN_ARGS, ...)
# is exported to each job. REQUEUE defaults to 0 here: the next job of the chain resumes
# instead of the stopped job requeueing itself (set REQUEUE=1 to have both). A job that finds
# training already finished exits 0 within a minute. DRY_RUN=1 prints the sbatch commands.
# Prints the job ids, one a line.
set -euo pipefail

usage() { echo "usage: [JOB_DIR=dir] $0 K [sbatch options...]" >&2; exit 2; }
[ $# -ge 1 ] || usage
K=$1; shift
[[ $K =~ ^[1-9][0-9]*$ ]] || usage

HERE=$(cd "$(dirname "$0")" && pwd)
SCRIPT=${SBATCH_SCRIPT:-$HERE/train_hetero.sbatch}
export MIMO_ROOT=${MIMO_ROOT:-$(cd "$HERE/.." && pwd)}
export JOB_DIR=${JOB_DIR:-$MIMO_ROOT/runs/mimo-hetero}
export REQUEUE=${REQUEUE:-0}
mkdir -p "$JOB_DIR"

prev=
for i in $(seq "$K"); do
    cmd=(sbatch --parsable --export=ALL)
    [ -n "$prev" ] && cmd+=(--dependency="afterany:$prev")
    cmd+=("$@" "$SCRIPT")
    if [ "${DRY_RUN:-0}" = 1 ]; then
        printf '%q ' "${cmd[@]}"; echo
        prev=DRYRUN$i
        continue
    fi
    prev=$("${cmd[@]}")
    prev=${prev%%;*}   # --parsable prints "id" or "id;cluster"
    echo "$prev"
done
