"""SLURM for real: sweeps through ``sbatch`` on a single-node cluster of this machine (issue 16).

The cluster comes from ``bash launchers/slurm_local.sh up`` (``.ci/run`` brings it up before the
tests and down after them); where it is not up these tests skip and say so. Everything stays on
loopback: slurmctld and slurmd listen on 127.0.0.1, munge on a local socket.

    bash launchers/slurm_local.sh up && python -m pytest tests/test_slurm.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
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


pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(not _cluster_up(), reason="no local SLURM cluster: run `bash launchers/slurm_local.sh up` "
                                                 "(as root, Debian; .ci/run does)"),
]


def _sweep(*args: str, sweep_dir: Path, timeout: int = 600, wait: bool = True) -> subprocess.Popen | subprocess.CompletedProcess:
    command = [sys.executable, "-m", "ftrl.run", "-m", "hydra/launcher=slurm", *args, f"hydra.sweep.dir={sweep_dir}"]
    env = {**os.environ, **SLURM_ENV}
    if not wait:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def _jobs(sweep_dir: Path) -> list[Path]:
    return sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


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
