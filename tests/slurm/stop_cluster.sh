#!/usr/bin/env bash
# Stop the test cluster started by start_cluster.sh: slurmd, slurmctld (by their pid files in
# DIR) and, with STOP_MUNGE=1, munged. Cancels the cluster's jobs first.
#
#   bash tests/slurm/stop_cluster.sh [DIR]       # DIR default: /tmp/mimo-slurm
set -uo pipefail

DIR=${1:-/tmp/mimo-slurm}
[ -d "$DIR" ] || exit 0
DIR=$(cd "$DIR" && pwd)
export SLURM_CONF=$DIR/etc/slurm.conf

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

if alive "$DIR/run/slurmctld.pid"; then
    scancel --full --quiet --partition=debug 2>/dev/null || true
    for _ in $(seq 40); do
        [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
        sleep 0.5
    done
fi
for name in slurmd slurmctld; do
    pidfile=$DIR/run/$name.pid
    if alive "$pidfile"; then
        pid=$(cat "$pidfile")
        kill -TERM "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    fi
    rm -f "$pidfile"
done
if [ "${STOP_MUNGE:-0}" = 1 ] && alive /run/munge/munged.pid; then
    kill -TERM "$(cat /run/munge/munged.pid)"
fi
# proctrack/cgroup leaves its (empty) per-node freezer cgroup behind
[ -d /sys/fs/cgroup/freezer/slurm_localhost ] &&
    find /sys/fs/cgroup/freezer/slurm_localhost -depth -type d -exec rmdir {} + 2>/dev/null
echo "stop_cluster: stopped the cluster in $DIR" >&2
