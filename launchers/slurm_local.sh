#!/usr/bin/env bash
# A single-node SLURM cluster on this machine (munge + slurmctld + slurmd, one partition sized to the
# machine), for trying the SLURM path on a workstation and for the tests. Debian/Ubuntu, as root.
#
#   bash launchers/slurm_local.sh up       # install slurm-wlm + munge if missing, configure, start; idempotent
#   bash launchers/slurm_local.sh status   # sinfo of the partition (exit 1 when the cluster is not up)
#   bash launchers/slurm_local.sh down     # cancel jobs, stop the daemons; idempotent
#
# Then: FTRL_SLURM_PARTITION=local FTRL_SLURM_CPUS_PER_TASK=1 FTRL_SLURM_MEM_GB=4 \
#         python -m ftrl.run -m hydra/launcher=slurm +debug=smoke algorithm=grpo,reinforce_pp
#
# Environment (optional): FTRL_SLURM_LOCAL_PARTITION (local), FTRL_SLURM_LOCAL_MEM_MB (the machine's
# memory less 2 GB), FTRL_SLURM_LOCAL_DIR (/var/lib/ftrl-slurm: state, spool and logs).
# No cgroups are needed (proctrack/linuxproc, task/none), so it also runs in containers.
set -euo pipefail

PARTITION="${FTRL_SLURM_LOCAL_PARTITION:-local}"
ROOT="${FTRL_SLURM_LOCAL_DIR:-/var/lib/ftrl-slurm}"
CONF_DIR=/etc/slurm
NODE="$(hostname -s)"

log() { echo "[slurm_local] $*" >&2; }

install_if_missing() {
    if command -v slurmctld >/dev/null 2>&1 && command -v munged >/dev/null 2>&1; then
        return 0
    fi
    log "installing slurm-wlm and munge (Debian packages)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq slurm-wlm munge >/dev/null
}

write_config() {
    local cpus mem_mb
    cpus="$(nproc)"
    mem_mb="${FTRL_SLURM_LOCAL_MEM_MB:-$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) - 2048 ))}"
    mkdir -p "$CONF_DIR" "$ROOT/state" "$ROOT/spool" "$ROOT/log"
    cat > "$CONF_DIR/slurm.conf" <<EOF
# Written by launchers/slurm_local.sh: one node, one partition, no accounting, no cgroups.
ClusterName=ftrl-local
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$ROOT/state
SlurmdSpoolDir=$ROOT/spool
SlurmctldPidFile=$ROOT/slurmctld.pid
SlurmdPidFile=$ROOT/slurmd.pid
SlurmctldLogFile=$ROOT/log/slurmctld.log
SlurmdLogFile=$ROOT/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
KillWait=5
MinJobAge=60
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
}

start_munge() {
    if pgrep -x munged >/dev/null 2>&1; then
        return 0
    fi
    mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
    chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge 2>/dev/null || true
    chmod 0400 /etc/munge/munge.key
    chmod 0700 /etc/munge
    if id munge >/dev/null 2>&1; then
        runuser -u munge -- munged
    else
        munged --force
    fi
}

wait_idle() {
    local deadline=$((SECONDS + 60))
    while (( SECONDS < deadline )); do
        if sinfo -h -p "$PARTITION" -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
            return 0
        fi
        sleep 1
    done
    log "the node did not become idle in 60 s; see $ROOT/log/"
    sinfo -p "$PARTITION" -N -l >&2 || true
    return 1
}

up() {
    install_if_missing
    write_config
    start_munge
    pgrep -x slurmctld >/dev/null 2>&1 || slurmctld
    pgrep -x slurmd >/dev/null 2>&1 || slurmd
    wait_idle
    scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
    log "up: partition $PARTITION on $NODE ($(nproc) CPUs); logs in $ROOT/log"
}

down() {
    if command -v scancel >/dev/null 2>&1 && pgrep -x slurmctld >/dev/null 2>&1; then
        scancel --full --partition="$PARTITION" >/dev/null 2>&1 || true
    fi
    for daemon in slurmd slurmctld munged; do
        pkill -x "$daemon" >/dev/null 2>&1 || true
    done
    for daemon in slurmd slurmctld munged; do
        local deadline=$((SECONDS + 15))
        while pgrep -x "$daemon" >/dev/null 2>&1 && (( SECONDS < deadline )); do sleep 0.5; done
        pkill -9 -x "$daemon" >/dev/null 2>&1 || true
    done
    log "down"
}

status() {
    if ! pgrep -x slurmctld >/dev/null 2>&1; then
        log "not up (no slurmctld)"
        return 1
    fi
    sinfo -p "$PARTITION"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
