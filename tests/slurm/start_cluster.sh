#!/usr/bin/env bash
# Start a single-node Slurm cluster on this machine for the scheduler tests (as root; Debian's
# slurm-wlm and munge). cgroups are off (proctrack/linuxproc, task/none): CI sandboxes have no
# writable cgroup tree. Idempotent: a running cluster is left as it is.
# Usage: tests/slurm/start_cluster.sh [STATE_DIR]   (default /tmp/dlf-bids-slurm)
set -euo pipefail
state=${1:-/tmp/dlf-bids-slurm}
host=$(hostname -s)

if sinfo -h -o %T 2>/dev/null | grep -qx idle; then
    echo "slurm: already running on $host"; exit 0
fi
for cmd in munged slurmctld slurmd sinfo; do
    command -v "$cmd" >/dev/null || { echo "slurm: $cmd not found (apt-get install slurm-wlm munge)" >&2; exit 2; }
done

cpus=$(nproc)
mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
mkdir -p "$state"/{ctld,spool,log} /etc/slurm /run/munge /var/log/munge /var/lib/munge
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=dlftest
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/spool
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/slurmd.log
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF

# munge: Debian's package creates the key at install time; make one if it is missing.
[ -s /etc/munge/munge.key ] || { mungekey --create --force 2>/dev/null || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; }
chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
chmod 0400 /etc/munge/munge.key
pgrep -x munged >/dev/null || su -s /bin/sh munge -c munged 2>/dev/null || munged --force
# A controller that is not running starts cold (-c, and its saved state removed): a machine image
# taken while a test job ran (/tmp survives into the image) would otherwise recover that job,
# and the node would come up allocated to a job that no longer exists.
if ! pgrep -x slurmctld >/dev/null; then
    rm -rf "${state:?}"/ctld/* "${state:?}"/spool/*
    slurmctld -c
fi
pgrep -x slurmd >/dev/null || slurmd -c

for _ in $(seq 60); do
    if sinfo -h -o %T 2>/dev/null | grep -qx idle; then
        echo "slurm: single-node cluster up on $host ($cpus CPUs, ${mem_mb} MiB)"; exit 0
    fi
    sleep 1
done
echo "slurm: node did not become idle; see $state/log" >&2
sinfo >&2 || true
exit 1
