#!/usr/bin/env bash
# A single-node SLURM cluster on this machine (munge + slurmctld + slurmd, one partition sized to the
# machine), for trying the SLURM path on a workstation and for the tests. Debian/Ubuntu, as root.
#
#   bash launchers/slurm_local.sh up       # install slurm-wlm, munge, iproute2 if missing; configure; start
#                                          # (idempotent)
#   bash launchers/slurm_local.sh status   # sinfo of the partition (exit 1 when the cluster is not up)
#   bash launchers/slurm_local.sh down     # cancel jobs, stop the daemons; idempotent
#   bash launchers/slurm_local.sh env      # the `export SLURM_CONF=...` line its clients need
#
# Then: FTRL_SLURM_PARTITION=local FTRL_SLURM_CPUS_PER_TASK=1 FTRL_SLURM_MEM_GB=4 \
#         python -m ftrl.run -m hydra/launcher=slurm +debug=smoke algorithm=grpo,reinforce_pp
#
# A private instance (used by tests/test_slurm.py inside a network namespace of its own): with
# FTRL_SLURM_LOCAL_PREFIX=DIR everything lives under DIR -- slurm.conf (DIR/etc/slurm.conf; point the
# clients at it with `eval "$(bash launchers/slurm_local.sh env)"`), state, spool, logs, pid files and
# a munged with its own key and socket -- and nothing in /etc, /run or /var is read or written:
#   FTRL_SLURM_LOCAL_PREFIX=/tmp/x bash launchers/slurm_local.sh up   # ... and `down` with the same DIR
#
# Environment (optional): FTRL_SLURM_LOCAL_PARTITION (local), FTRL_SLURM_LOCAL_MEM_MB (the machine's
# memory less 2 GB), FTRL_SLURM_LOCAL_DIR (/var/lib/ftrl-slurm: state, spool and logs of the default
# instance), FTRL_SLURM_LOCAL_PREFIX (see above), FTRL_SLURM_LOCAL_CTLD_PORT (6817) and
# FTRL_SLURM_LOCAL_SLURMD_PORT (6818). Daemons are found through their pid files, never by name.
# No cgroups are needed (proctrack/linuxproc, task/none), so it also runs in containers.
set -euo pipefail

PARTITION="${FTRL_SLURM_LOCAL_PARTITION:-local}"
PREFIX="${FTRL_SLURM_LOCAL_PREFIX:-}"
CTLD_PORT="${FTRL_SLURM_LOCAL_CTLD_PORT:-6817}"
SLURMD_PORT="${FTRL_SLURM_LOCAL_SLURMD_PORT:-6818}"
if [[ -n "$PREFIX" ]]; then
    PREFIX="$(realpath -m "$PREFIX")"
    ROOT="$PREFIX"
    CONF_DIR="$PREFIX/etc"
    MUNGE_DIR="$PREFIX/munge"
    MUNGE_SOCKET="$MUNGE_DIR/munge.socket"
    MUNGE_PID="$MUNGE_DIR/munged.pid"
    export SLURM_CONF="$CONF_DIR/slurm.conf"
else
    ROOT="${FTRL_SLURM_LOCAL_DIR:-/var/lib/ftrl-slurm}"
    CONF_DIR=/etc/slurm
    MUNGE_SOCKET=/run/munge/munge.socket.2
    MUNGE_PID=/run/munge/munged.pid
fi
NODE="$(hostname -s)"

log() { echo "[slurm_local] $*" >&2; }

# slurm-wlm and munge; iproute2 (ip, ss) for the tests' private network namespace.
install_if_missing() {
    if command -v slurmctld && command -v munged && command -v ip && command -v ss; then
        return 0
    fi >/dev/null 2>&1
    log "installing slurm-wlm, munge and iproute2 (Debian packages)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq slurm-wlm munge iproute2 >/dev/null
}

# The pid in PIDFILE when that process is alive and is DAEMON (guards against a reused pid).
daemon_pid() {
    local pidfile="$1" daemon="$2" pid
    [[ -s "$pidfile" ]] || return 1
    pid="$(tr -dc '0-9' <"$pidfile")"
    [[ -n "$pid" && "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$daemon" ]] || return 1
    echo "$pid"
}

write_config() {
    local cpus mem_mb auth_info="" node_addr=127.0.0.1 bind_loopback="" resolved
    cpus="$(nproc)"
    # SLURM binds 0.0.0.0 unless told NoInAddrAny, then it binds what the host name resolves to: do
    # that where the name resolves to a loopback address (Debian's /etc/hosts does), so nothing listens
    # beyond loopback; otherwise keep the wildcard and reach the node at 127.0.0.1.
    resolved="$(getent ahostsv4 "$NODE" 2>/dev/null | awk 'NR == 1 {print $1}')"
    if [[ "$resolved" == 127.* ]]; then
        node_addr="$resolved"
        bind_loopback="CommunicationParameters=NoInAddrAny,NoCtldInAddrAny"
    fi
    mem_mb="${FTRL_SLURM_LOCAL_MEM_MB:-$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) - 2048 ))}"
    [[ -n "$PREFIX" ]] && auth_info="AuthInfo=socket=$MUNGE_SOCKET"
    mkdir -p "$CONF_DIR" "$ROOT/state" "$ROOT/spool" "$ROOT/log"
    cat > "$CONF_DIR/slurm.conf" <<EOF
# Written by launchers/slurm_local.sh: one node, one partition, no accounting, no cgroups.
ClusterName=ftrl-local
SlurmctldHost=$NODE($node_addr)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
$auth_info
$bind_loopback
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
NodeName=$NODE NodeAddr=$node_addr CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
}

start_munge() {
    daemon_pid "$MUNGE_PID" munged >/dev/null && return 0
    if [[ -n "$PREFIX" ]]; then  # a private munged (as root, hence --force) with its own key and socket
        mkdir -p "$MUNGE_DIR"
        chmod 0700 "$MUNGE_DIR"
        [[ -s "$MUNGE_DIR/munge.key" ]] || dd if=/dev/urandom of="$MUNGE_DIR/munge.key" bs=1 count=1024 status=none
        chmod 0400 "$MUNGE_DIR/munge.key"
        munged --force --socket="$MUNGE_SOCKET" --key-file="$MUNGE_DIR/munge.key" --pid-file="$MUNGE_PID" \
            --log-file="$ROOT/log/munged.log" --seed-file="$MUNGE_DIR/munged.seed"
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
        sleep 0.2
    done
    log "the node did not become idle in 60 s; see $ROOT/log/"
    sinfo -p "$PARTITION" -N -l >&2 || true
    return 1
}

up() {
    install_if_missing
    write_config
    start_munge
    daemon_pid "$ROOT/slurmctld.pid" slurmctld >/dev/null || slurmctld -f "$CONF_DIR/slurm.conf"
    daemon_pid "$ROOT/slurmd.pid" slurmd >/dev/null || slurmd -f "$CONF_DIR/slurm.conf"
    wait_idle
    scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
    log "up: partition $PARTITION on $NODE ($(nproc) CPUs), ports $CTLD_PORT/$SLURMD_PORT; logs in $ROOT/log"
    [[ -z "$PREFIX" ]] || log "clients need: export SLURM_CONF=$SLURM_CONF"
}

# Stop the daemons named by PIDFILE DAEMON pairs: TERM to all at once, up to 15 s, then KILL. Waits on
# the processes themselves: the daemons remove their pid files before they have exited.
stop_daemons() {
    local -a pids=() names=()
    local pid i deadline=$((SECONDS + 15))
    while (( $# >= 2 )); do
        if pid="$(daemon_pid "$1" "$2")"; then
            kill "$pid" 2>/dev/null || true
            pids+=("$pid")
            names+=("$2")
        fi
        shift 2
    done
    for i in "${!pids[@]}"; do
        while [[ "$(cat "/proc/${pids[$i]}/comm" 2>/dev/null)" == "${names[$i]}" ]]; do
            if (( SECONDS >= deadline )); then
                kill -9 "${pids[$i]}" 2>/dev/null || true
                break
            fi
            sleep 0.1
        done
    done
    return 0
}

down() {
    if command -v scancel >/dev/null 2>&1 && daemon_pid "$ROOT/slurmctld.pid" slurmctld >/dev/null; then
        scancel --full --partition="$PARTITION" >/dev/null 2>&1 || true
    fi
    stop_daemons "$ROOT/slurmd.pid" slurmd "$ROOT/slurmctld.pid" slurmctld "$MUNGE_PID" munged
    log "down"
}

status() {
    if ! daemon_pid "$ROOT/slurmctld.pid" slurmctld >/dev/null; then
        log "not up (no slurmctld for $ROOT)"
        return 1
    fi
    sinfo -p "$PARTITION"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    env) echo "export SLURM_CONF=${SLURM_CONF:-$CONF_DIR/slurm.conf}" ;;
    *) echo "usage: $0 up|down|status|env   (FTRL_SLURM_LOCAL_PREFIX=DIR for a private instance)" >&2; exit 2 ;;
esac
