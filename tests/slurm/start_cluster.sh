#!/usr/bin/env bash
# Start a real one-node Slurm (Debian's slurmctld + slurmd + munge) for the tests.
#
#   bash tests/slurm/start_cluster.sh [DIR]      # DIR default: /tmp/mimo-slurm
#   export SLURM_CONF=DIR/etc/slurm.conf         # every Slurm client call needs it
#
# Installs the packages when missing (apt-get, non-interactive), writes DIR/etc/slurm.conf (and
# cgroup.conf), starts munged, slurmctld and slurmd as root without systemd, and waits until
# `sinfo` shows the node idle. Idempotent: daemons already running from DIR are reused.
# Needs root. Exit status: 0 = cluster up, 3 = cannot run here (not root, no apt-get, install
# failed), 1 = daemons did not come up (see DIR/log/).
# Environment: SLURM_NODE_CPUS (default: nproc), SLURM_INSTALL=0 to never call apt-get.
set -euo pipefail

DIR=${1:-/tmp/mimo-slurm}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
CONF=$DIR/etc/slurm.conf
export SLURM_CONF=$CONF
say() { echo "start_cluster: $*" >&2; }
cant() { say "cannot run Slurm here: $*"; exit 3; }

[ "$(id -u)" = 0 ] || cant "needs root (daemons run as root without systemd)"

# --- packages ---------------------------------------------------------------------------------
need_install=0
for bin in /usr/sbin/slurmctld /usr/sbin/slurmd /usr/sbin/munged /usr/bin/sbatch /usr/bin/sinfo; do
    [ -x "$bin" ] || need_install=1
done
if [ "$need_install" = 1 ]; then
    [ "${SLURM_INSTALL:-1}" = 1 ] || cant "Slurm packages missing and SLURM_INSTALL=0"
    command -v apt-get >/dev/null || cant "Slurm packages missing and no apt-get"
    say "installing slurmctld slurmd slurm-client munge (about a minute)"
    mkdir -p "$DIR/log"
    {
        apt-get update &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            slurmctld slurmd slurm-client munge
    } >"$DIR/log/apt.log" 2>&1 || { tail -20 "$DIR/log/apt.log" >&2; cant "apt-get install failed"; }
fi

# --- munge ------------------------------------------------------------------------------------
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
chmod 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
    say "creating /etc/munge/munge.key"
    if command -v mungekey >/dev/null; then
        mungekey --create --keyfile /etc/munge/munge.key
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
fi
if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    say "starting munged"
    rm -f /run/munge/munged.pid
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do
        munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break
        sleep 0.1
    done
    munge -n </dev/null | unmunge >/dev/null || { say "munged did not start"; exit 1; }
fi

# --- already up? ------------------------------------------------------------------------------
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
node_state() { sinfo -h -N -o '%t' 2>/dev/null | head -1; }
if [ -f "$CONF" ] && alive "$DIR/run/slurmctld.pid" && alive "$DIR/run/slurmd.pid"; then
    if [ "$(node_state)" = idle ] || [ "$(node_state)" = mix ] || [ "$(node_state)" = alloc ]; then
        say "reusing the running cluster in $DIR"
        echo "export SLURM_CONF=$CONF"
        exit 0
    fi
fi

# --- config -----------------------------------------------------------------------------------
# Stop leftovers of an earlier start from this DIR (by pid file only).
for name in slurmd slurmctld; do
    if alive "$DIR/run/$name.pid"; then kill "$(cat "$DIR/run/$name.pid")" || true; sleep 1; fi
done
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for port in 6817 6818; do
    port_busy "$port" && cant "port $port is taken: another Slurm (not started from $DIR) is running"
done
CPUS=${SLURM_NODE_CPUS:-$(nproc)}
if [ -d /sys/fs/cgroup/freezer ] && grep -q ' /sys/fs/cgroup/freezer cgroup ' /proc/mounts; then
    PROCTRACK=proctrack/cgroup   # kills every process of a job, torchrun workers included
else
    PROCTRACK=proctrack/linuxproc
fi
rm -rf "$DIR/state"   # a fresh cluster: no jobs recovered from an earlier start
mkdir -p "$DIR"/{etc,state/ctld,state/d,run,log}
cat >"$CONF" <<EOF
# Written by tests/slurm/start_cluster.sh: a one-node test cluster.
ClusterName=mimotest
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# default 120 s would delay every requeue by 2 minutes; with 5 a requeued job restarts ~6 s later
AuthInfo=cred_expire=5
CredType=cred/munge
StateSaveLocation=$DIR/state/ctld
SlurmdSpoolDir=$DIR/state/d
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=$PROCTRACK
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5,bf_interval=5
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=30
MailProg=/bin/true
NodeName=localhost CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
cat >"$DIR/etc/cgroup.conf" <<EOF
CgroupPlugin=cgroup/v1
CgroupMountpoint=/sys/fs/cgroup
CgroupAutomount=no
ConstrainCores=no
ConstrainRAMSpace=no
ConstrainDevices=no
EOF

# --- daemons ----------------------------------------------------------------------------------
say "starting slurmctld and slurmd ($PROCTRACK, $CPUS CPUs) in $DIR"
/usr/sbin/slurmctld -f "$CONF" || { tail -20 "$DIR/log/slurmctld.log" >&2; exit 1; }
/usr/sbin/slurmd -f "$CONF" -N localhost || { tail -20 "$DIR/log/slurmd.log" >&2; exit 1; }
state=
for _ in $(seq 120); do
    state=$(node_state || true)
    [ "$state" = idle ] && break
    case "$state" in
        down*|drain*) scontrol update NodeName=localhost State=RESUME >/dev/null 2>&1 || true ;;
    esac
    sleep 0.5
done
for name in slurmctld slurmd; do
    alive "$DIR/run/$name.pid" || { state="$name not running"; break; }
done
if [ "$state" != idle ]; then
    say "node not idle after 60 s (state: '${state:-none}')"
    tail -20 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true
    exit 1
fi
say "cluster up: $(sinfo -h -N -o '%N %t %c CPUs')"
echo "export SLURM_CONF=$CONF"
