"""SLURM for real: sweeps through ``sbatch`` on a single-node cluster of this machine (issue 16), and
``launchers/ray_slurm.sbatch`` starting a real Ray cluster (head + a worker on the same node) under SLURM.

The sweep tests use the cluster from ``bash launchers/slurm_local.sh up`` (``.ci/run`` brings it up
before the tests and down after them); where it is not up they skip and say so. Everything stays on
loopback: slurmctld and slurmd are reached on 127.0.0.1, munge on a local socket.

The Ray test brings up a private instance of its own (``FTRL_SLURM_LOCAL_PREFIX``: own conf, state,
munge key and socket, ports) inside a fresh network + PID namespace (``unshare``), where ``lo`` is the
only interface: Ray cannot bind or reach anything but loopback there, and nothing of it outlives the
namespace. It needs root, ``unshare``, iproute2 and SLURM installed, and skips with the reason otherwise.

    bash launchers/slurm_local.sh up && python -m pytest tests/test_slurm.py -q
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SLURM_ENV = {"FTRL_SLURM_PARTITION": "local", "FTRL_SLURM_CPUS_PER_TASK": "1", "FTRL_SLURM_MEM_GB": "4",
             "FTRL_SLURM_TIME_MIN": "30", "FTRL_SLURM_ARRAY_PARALLELISM": "2"}
SMOKE = ["+debug=smoke", "train.rounds=1", "stages=[build_envs,collect,train,eval]"]


def _cluster_up() -> bool:
    result = subprocess.run(["bash", str(ROOT / "launchers" / "slurm_local.sh"), "status"], capture_output=True,
                            text=True, timeout=30, check=False)
    return result.returncode == 0 and any(state in result.stdout.split() for state in ("idle", "mix", "alloc"))


pytestmark = pytest.mark.slurm
needs_cluster = pytest.mark.skipif(not _cluster_up(), reason="no local SLURM cluster: run `bash launchers/"
                                                             "slurm_local.sh up` (as root, Debian; .ci/run does)")


def _sweep(*args: str, sweep_dir: Path, timeout: int = 600, wait: bool = True) -> subprocess.Popen | subprocess.CompletedProcess:
    command = [sys.executable, "-m", "ftrl.run", "-m", "hydra/launcher=slurm", *args, f"hydra.sweep.dir={sweep_dir}"]
    env = {**os.environ, **SLURM_ENV}
    if not wait:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def _jobs(sweep_dir: Path) -> list[Path]:
    """The sweep's run directories (not submitit's folder, nor the sweep-level ``comparison/``)."""
    return sorted(p for p in sweep_dir.iterdir() if (p / "manifest.json").exists())


@needs_cluster
def test_a_sweep_runs_as_slurm_jobs_and_reports_itself(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    result = _sweep(*SMOKE, "algorithm=grpo,reinforce_pp", sweep_dir=sweep_dir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    jobs = _jobs(sweep_dir)
    assert [job.name for job in jobs] == ["debug=smoke,algorithm=grpo,train.rounds=1",
                                          "debug=smoke,algorithm=reinforce_pp,train.rounds=1"]
    array_ids = set()
    for job in jobs:
        slurm_jobs = json.loads((job / "manifest.json").read_text())["slurm_jobs"]
        assert len(slurm_jobs) == 1 and slurm_jobs[0]["job_id"].isdigit()
        array_ids.add(slurm_jobs[0]["array_job_id"])
        summary = json.loads((job / "summary.json").read_text())
        assert [e["checkpoint"] for e in summary["evals"]] == ["base", "warmup", "round1"]
    assert len(array_ids) == 1  # one job array for the sweep
    table = (sweep_dir / "sweep_table.md").read_text()
    assert "| grpo |" in table and "| reinforce_pp |" in table
    assert (sweep_dir / "comparison" / "comparison.md").exists()  # the sweep-level comparison, beside the jobs


@needs_cluster
def test_a_job_cancelled_by_slurm_resumes_when_resubmitted(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    args = (*SMOKE, "algorithm=grpo")
    first = _sweep(*args, sweep_dir=sweep_dir, wait=False)
    job_dir = sweep_dir / "debug=smoke,algorithm=grpo,train.rounds=1"
    deadline = time.time() + 300
    while not (job_dir / "stages" / "collect_r1.json").exists():  # cancel it once collection is done
        assert first.poll() is None and time.time() < deadline, first.stdout.read() if first.stdout else ""
        time.sleep(0.5)
    job_id = json.loads((job_dir / "manifest.json").read_text())["slurm_jobs"][0]["job_id"]
    subprocess.run(["scancel", job_id], check=True, timeout=30)
    while subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True, check=False).stdout.strip():
        assert time.time() < deadline
        time.sleep(0.5)
    # Without SLURM accounting (the local cluster has no slurmdbd) submitit cannot see that the job was
    # cancelled and keeps waiting; the user stops the sweep command, as here, and submits it again.
    first.terminate()
    first.wait(timeout=60)
    built = json.loads((job_dir / "stages" / "build_envs.json").read_text())["finished_at"]
    snapshots = (job_dir / "rounds" / "r1" / "snapshots.jsonl").read_text().splitlines()

    again = _sweep(*args, sweep_dir=sweep_dir)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    manifest = json.loads((job_dir / "manifest.json").read_text())
    assert manifest["slurm_jobs"][0]["job_id"] == job_id and len(manifest["slurm_jobs"]) == 2
    assert json.loads((job_dir / "stages" / "build_envs.json").read_text())["finished_at"] == built  # not redone
    assert (job_dir / "rounds" / "r1" / "snapshots.jsonl").read_text().splitlines() == snapshots  # nothing doubled
    summary = json.loads((job_dir / "summary.json").read_text())
    assert [e["checkpoint"] for e in summary["evals"]] == ["base", "warmup", "round1"]


@needs_cluster
def test_the_sweep_helper_submits_from_a_clean_worktree(tmp_path: Path) -> None:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()
    sweep_dir = tmp_path / "sweep"
    command = [sys.executable, "launchers/sweep.py", "--commit", head, "--", "hydra/launcher=slurm", "+debug=smoke",
               "stages=[build_envs]", "seed=1,2", f"hydra.sweep.dir={sweep_dir}"]
    result = subprocess.run(command, cwd=ROOT, env={**os.environ, **SLURM_ENV}, capture_output=True, text=True,
                            timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    jobs = _jobs(sweep_dir)
    assert len(jobs) == 2
    for job in jobs:
        manifest = json.loads((job / "manifest.json").read_text())
        assert manifest["git_sha"].startswith(head) and manifest["slurm_jobs"]


# ------------------------------------------------------------------------- Ray on SLURM, in a netns
RAY_BIN = Path(sys.executable).parent / "ray"
# Runs as PID 1 of a new network + PID namespace: a private SLURM instance, the batch script, teardown.
NETNS_SCRIPT = r"""
set -euo pipefail
ip link set lo up
# glibc's getaddrinfo(AI_ADDRCONFIG) does not count 127.0.0.1 as a configured IPv4 address, so with it
# alone SLURM cannot resolve even "127.0.0.1"; a second loopback address fixes that (still only lo).
ip addr add 127.0.0.2/8 dev lo
ip -o addr show > "$OUT/addresses.txt"
export FTRL_SLURM_LOCAL_PREFIX="$WORK/slurm" FTRL_SLURM_LOCAL_CTLD_PORT=16817 FTRL_SLURM_LOCAL_SLURMD_PORT=16818
bash launchers/slurm_local.sh up
eval "$(bash launchers/slurm_local.sh env)"
trap 'bash launchers/slurm_local.sh down' EXIT
job=$(sbatch --parsable --nodes=1 --ntasks-per-node=1 --cpus-per-task=1 --gpus-per-node=0 --mem=4G --time=10 \
    --output="$OUT/ray-%j.out" launchers/ray_slurm.sbatch "$PYTHON" "$WORK/payload.py" "$OUT/result.json")
# Poll the job (`sbatch --wait` sleeps 2, 8, then 32 s between its own polls).
while scontrol show job "$job" | grep -qE 'JobState=(PENDING|CONFIGURING|RUNNING|COMPLETING)'; do sleep 0.5; done
scontrol show job "$job" > "$OUT/job.txt"
# The job has ended: wait (bounded) until only the SLURM daemons and this shell are left.
for _ in $(seq 50); do
    ps -e -o pid=,comm= > "$WORK/ps.txt"
    awk '$1 != 1 && $2 !~ /^(ps|munged|slurmctld|slurmscriptd|slurmd)$/' "$WORK/ps.txt" | grep -q . || break
    sleep 0.2
done
ps -e -o pid=,comm=,args= > "$OUT/ps_after_job.txt"
bash launchers/slurm_local.sh down
trap - EXIT
ps -e -o pid=,comm=,args= > "$OUT/ps_after_down.txt"
"""
# The job's command: a trivial Ray task on each Ray node, plus the sockets seen while Ray is up.
PAYLOAD = r"""
import json, os, subprocess, sys
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

ray.init()  # RAY_ADDRESS, exported by launchers/ray_cluster.sh

@ray.remote(num_cpus=1)
def square(x):
    return x * x, ray.get_runtime_context().get_node_id()

nodes = sorted((n["NodeID"], n["NodeManagerAddress"]) for n in ray.nodes() if n["Alive"])
results = [ray.get(square.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(i + 2))
           for i, (node, _) in enumerate(nodes)]
sockets = subprocess.run(["ss", "-tuanp"], capture_output=True, text=True, check=True).stdout
with open(sys.argv[1], "w") as f:
    json.dump({"address": os.environ["RAY_ADDRESS"], "nodes": nodes, "results": results, "ss": sockets}, f)
"""


def _netns_unavailable() -> str:
    if os.geteuid() != 0:
        return "needs root (a private SLURM instance in its own network namespace)"
    tools = ("unshare", "ip", "ss", "munged", "slurmctld", "slurmd", "sbatch")
    missing = [tool for tool in tools if not shutil.which(tool)] + ([] if RAY_BIN.exists() else [str(RAY_BIN)])
    if missing:
        return f"missing {', '.join(missing)} (bash launchers/slurm_local.sh up installs SLURM; Ray comes with verl)"
    probe = subprocess.run(["unshare", "--net", "--pid", "--fork", "--mount-proc", "true"], capture_output=True,
                           text=True, timeout=30, check=False)
    return "" if probe.returncode == 0 else f"unshare --net --pid fails here: {probe.stderr.strip()}"


def _host(endpoint: str) -> str:
    return endpoint.rsplit(":", 1)[0].strip("[]").removeprefix("::ffff:").split("%")[0]


def _on_loopback(socket: list[str]) -> bool:
    """An ``ss -tuanp`` row: both ends on loopback (a listener's peer is a wildcard). SLURM binds the
    wildcard where the host name does not resolve to loopback (launchers/slurm_local.sh); here, where
    only lo exists, that is loopback too. Everything else must be bound to 127.x itself."""
    state, local, peer, process = socket[1], _host(socket[4]), _host(socket[5]), " ".join(socket[6:])
    wildcard = ("0.0.0.0", "*", "::")
    slurm = any(f'"{name}"' in process for name in ("slurmctld", "slurmd", "srun", "slurmstepd"))
    local_ok = local.startswith("127.") or local == "::1" or (slurm and local in wildcard)
    peer_ok = peer.startswith("127.") or peer == "::1" or (state in ("LISTEN", "UNCONN") and peer in wildcard)
    return local_ok and peer_ok


def _leftovers(ps_file: Path) -> set[str]:
    """Process names in a ``ps -e -o pid=,comm=,args=`` listing other than PID 1 (the namespace's shell) and ps."""
    rows = [line.split() for line in ps_file.read_text().splitlines() if line.strip()]
    return {row[1] for row in rows if row[0] != "1" and row[1] != "ps"}


NETNS_UNAVAILABLE = _netns_unavailable()


@pytest.mark.skipif(bool(NETNS_UNAVAILABLE), reason=NETNS_UNAVAILABLE or "available")
def test_ray_slurm_sbatch_runs_a_real_ray_cluster_and_tears_it_down(tmp_path: Path) -> None:
    work = Path(tempfile.mkdtemp(prefix="ftrl-rs-", dir="/tmp"))  # short: Ray's unix socket paths live here
    try:
        (work / "payload.py").write_text(PAYLOAD)
        env = {**os.environ, "OUT": str(tmp_path), "WORK": str(work), "PYTHON": sys.executable, "FTRL_ROOT": str(ROOT),
               "RAY_TMPDIR": str(work), "FTRL_RAY_BIN": str(RAY_BIN), "FTRL_RAY_HEAD_IP": "127.0.0.1",
               "FTRL_RAY_HEAD_NODE_WORKERS": "1", "FTRL_RAY_NUM_GPUS": "0", "FTRL_RAY_WAIT_S": "120",
               "FTRL_RAY_HEAD_ARGS": "--include-dashboard=false",
               "PATH": f"{RAY_BIN.parent}{os.pathsep}{os.environ['PATH']}"}
        result = subprocess.run(["unshare", "--net", "--pid", "--fork", "--mount-proc", "--kill-child", "bash", "-c",
                                 NETNS_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400,
                                check=False)
        job_logs = "\n".join(p.read_text()[-4000:] for p in tmp_path.glob("ray-*.out"))
        assert result.returncode == 0, result.stderr[-3000:] + job_logs
    finally:
        shutil.rmtree(work, ignore_errors=True)
    # Only loopback exists in the namespace, and every socket Ray and SLURM had open was on it.
    assert {line.split()[1] for line in (tmp_path / "addresses.txt").read_text().splitlines()} == {"lo"}
    ray_run = json.loads((tmp_path / "result.json").read_text())
    sockets = [line.split() for line in ray_run["ss"].splitlines()[1:]]
    assert sockets and all(_on_loopback(s) for s in sockets), ray_run["ss"]
    assert any("gcs_server" in line and ":6379" in line for line in ray_run["ss"].splitlines())
    # A head and a worker on the same node, one task on each, all at 127.0.0.1.
    assert ray_run["address"] == "127.0.0.1:6379"
    assert len(ray_run["nodes"]) == 2 and {address for _, address in ray_run["nodes"]} == {"127.0.0.1"}
    assert ray_run["results"] == [[4, ray_run["nodes"][0][0]], [9, ray_run["nodes"][1][0]]]
    job = (tmp_path / "job.txt").read_text()
    assert "JobState=COMPLETED" in job and "ExitCode=0:0" in job, job
    job_log = next(tmp_path.glob("ray-*.out")).read_text()
    assert "2/2 nodes joined" in job_log and "[ray_cluster] stopped" in job_log
    assert "command exited with status 0" in job_log
    # Ray gone when the job ended (SLURM still up), and nothing at all left after `down`.
    assert _leftovers(tmp_path / "ps_after_job.txt") == {"munged", "slurmctld", "slurmscriptd", "slurmd"}
    assert _leftovers(tmp_path / "ps_after_down.txt") == set()
