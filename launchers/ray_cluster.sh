# shellcheck shell=bash
# Ray cluster across the nodes of a SLURM allocation, for verl jobs that span several nodes.
#
# Source this file inside a SLURM job (the batch script runs on the allocation's first node), then:
#   ftrl_ray_start   # on >1 node: Ray head here, one Ray worker per other node (srun), wait for all,
#                    # export RAY_ADDRESS so verl joins this cluster; on 1 node: nothing (verl starts
#                    # its own local Ray) unless FTRL_RAY_HEAD_NODE_WORKERS asks for workers there
#   ftrl_ray_stop    # stop the workers and the head (safe to call twice, and when nothing started)
# Used by launchers/ray_slurm.sbatch and by hydra/launcher=slurm (its setup/teardown lines).
#
# Environment (all optional):
#   FTRL_RAY_PORT       head port (6379)
#   FTRL_RAY_HEAD_IP    address the workers dial (default: this host's first address)
#   FTRL_RAY_NUM_GPUS   GPUs per node given to Ray (default: SLURM_GPUS_ON_NODE, else the GPU count)
#   FTRL_RAY_NUM_CPUS   CPUs per node given to Ray (default: SLURM_CPUS_PER_TASK, else all)
#   FTRL_RAY_WAIT_S     seconds to wait for every node to join (300)
#   FTRL_RAY_BIN        the ray executable (ray)
#   FTRL_RAY_HEAD_ARGS  more arguments for the head's `ray start`, e.g. --include-dashboard=false
#   FTRL_RAY_HEAD_NODE_WORKERS  extra Ray worker nodes on the head's own node (0), e.g. 1 to try the
#                       multi-node path on one machine (each Ray node gets the CPUs/GPUs above, so set
#                       FTRL_RAY_NUM_* to split the machine); with it a 1-node job starts a cluster too

FTRL_RAY_WORKERS_PID=""
FTRL_RAY_HEAD_STARTED=0

ftrl_ray_log() {
    echo "[ray_cluster] $*" >&2
}

# Number of nodes in the allocation (1 outside SLURM).
ftrl_ray_num_nodes() {
    echo "${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"
}

ftrl_ray_resource_flags() {
    local gpus="${FTRL_RAY_NUM_GPUS:-${SLURM_GPUS_ON_NODE:-}}"
    local cpus="${FTRL_RAY_NUM_CPUS:-${SLURM_CPUS_PER_TASK:-}}"
    if [[ -z "$gpus" ]] && command -v nvidia-smi >/dev/null 2>&1; then
        gpus="$(nvidia-smi --list-gpus | wc -l)"
    fi
    [[ -n "$gpus" ]] && printf -- '--num-gpus=%s\n' "$gpus"
    [[ -n "$cpus" ]] && printf -- '--num-cpus=%s\n' "$cpus"
    return 0
}

# Alive nodes according to `ray status` (the lines under "Active:" such as " 1 node_ab12...").
ftrl_ray_alive_nodes() {
    # `ray status` fails until the head answers; that counts as no node yet (and must not trip set -e).
    { "${FTRL_RAY_BIN:-ray}" status --address="$1" 2>/dev/null || true; } \
        | awk '/^Active:/ {active = 1; next} /^[A-Za-z]/ {active = 0} active && /node_/ {count += $1} END {print count + 0}'
}

ftrl_ray_start() {
    local nodes extra
    nodes="$(ftrl_ray_num_nodes)"
    extra="${FTRL_RAY_HEAD_NODE_WORKERS:-0}"
    if (( nodes <= 1 && extra <= 0 )); then
        ftrl_ray_log "single node: no cluster to start (verl starts a local Ray instance)"
        return 0
    fi
    local ray="${FTRL_RAY_BIN:-ray}"
    local port="${FTRL_RAY_PORT:-6379}"
    local head_node head_ip
    head_node="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
    head_ip="${FTRL_RAY_HEAD_IP:-$(hostname --ip-address | awk '{print $1}')}"
    local address="${head_ip}:${port}"
    local expected=$((nodes + extra))
    local -a resources
    mapfile -t resources < <(ftrl_ray_resource_flags)

    ftrl_ray_log "head on ${head_node} (${address}), ${nodes} nodes, ${resources[*]}"
    local -a head_args
    read -r -a head_args <<<"${FTRL_RAY_HEAD_ARGS:-}"
    "$ray" start --head --node-ip-address="$head_ip" --port="$port" --disable-usage-stats "${resources[@]}" \
        "${head_args[@]}"
    FTRL_RAY_HEAD_STARTED=1

    # One worker per remaining node; --block keeps each srun task alive as long as its worker.
    if (( nodes > 1 )); then
        srun --overlap --nodes="$((nodes - 1))" --ntasks="$((nodes - 1))" --ntasks-per-node=1 \
            --exclude="$head_node" "$ray" start --address="$address" --disable-usage-stats --block \
            "${resources[@]}" &
        FTRL_RAY_WORKERS_PID+=" $!"
    fi
    if (( extra > 0 )); then  # workers beside the head: same address, ports of their own
        ftrl_ray_log "${extra} more Ray node(s) on ${head_node}"
        srun --overlap --nodes=1 --ntasks="$extra" --ntasks-per-node="$extra" --nodelist="$head_node" \
            "$ray" start --address="$address" --node-ip-address="$head_ip" --disable-usage-stats --block \
            "${resources[@]}" &
        FTRL_RAY_WORKERS_PID+=" $!"
    fi

    local waited=0 alive=0 timeout="${FTRL_RAY_WAIT_S:-300}"
    while true; do
        alive="$(ftrl_ray_alive_nodes "$address")"
        if (( alive >= expected )); then
            ftrl_ray_log "${alive}/${expected} nodes joined after ${waited}s"
            export RAY_ADDRESS="$address"
            return 0
        fi
        (( waited >= timeout )) && break
        sleep 5
        waited=$((waited + 5))
    done
    ftrl_ray_log "only ${alive}/${expected} nodes joined within ${timeout}s; stopping"
    ftrl_ray_stop
    return 1
}

ftrl_ray_stop() {
    local pid
    for pid in $FTRL_RAY_WORKERS_PID; do  # the srun steps that hold the workers
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    FTRL_RAY_WORKERS_PID=""
    if (( FTRL_RAY_HEAD_STARTED )); then
        "${FTRL_RAY_BIN:-ray}" stop --force >/dev/null 2>&1 || true
        FTRL_RAY_HEAD_STARTED=0
        ftrl_ray_log "stopped"
    fi
    return 0
}
