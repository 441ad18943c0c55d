"""Cluster launchers on CPU: the Ray-on-SLURM batch script against stub SLURM/Ray commands, and the
W&B offline-run sync helper against a stub ``wandb`` executable.

The stubs (``scontrol``, ``srun``, ``ray``, ``hostname``) append their arguments to a log and answer
like the real tools, so the test sees exactly what the script runs, in which order.

    OMP_NUM_THREADS=1 python -m pytest tests/test_launchers.py -q
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SBATCH = ROOT / "launchers" / "ray_slurm.sbatch"
WANDB_SYNC = ROOT / "launchers" / "wandb_sync.py"

STUBS = {
    "scontrol": 'echo "scontrol $*" >>"$STUB_LOG"\nprintf "gpu-a\\ngpu-b\\ngpu-c\\n"\n',
    "hostname": 'echo "10.1.2.3 127.0.1.1"\n',
    "srun": 'echo "srun $*" >>"$STUB_LOG"\n',
    # `ray status` reports STUB_ALIVE nodes under "Active:" as the real output does.
    "ray": '''echo "ray $*" >>"$STUB_LOG"
if [ "$1" = status ]; then
  echo "======== Autoscaler status ========"
  echo "Node status"
  echo "Active:"
  i=0
  while [ "$i" -lt "$STUB_ALIVE" ]; do echo " 1 node_$i"; i=$((i + 1)); done
  echo "Pending:"
  echo " (no pending nodes)"
fi
''',
}


@pytest.fixture()
def stub_path(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in STUBS.items():
        script = bin_dir / name
        script.write_text("#!/bin/sh\n" + body)
        script.chmod(0o755)
    return bin_dir


def _run_sbatch(tmp_path: Path, stub_path: Path, command: list[str], nodes: int, alive: int,
                **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    log = tmp_path / "calls.log"
    full_env = {
        "PATH": f"{stub_path}{os.pathsep}{os.environ['PATH']}",
        "STUB_LOG": str(log), "STUB_ALIVE": str(alive),
        "SLURM_JOB_NUM_NODES": str(nodes), "SLURM_JOB_NODELIST": "gpu-[a-c]", "SLURM_JOB_ID": "77",
        "SLURM_GPUS_ON_NODE": "8", "SLURM_CPUS_PER_TASK": "64", "FTRL_ROOT": str(ROOT), "HOME": str(tmp_path),
        **env,
    }
    result = subprocess.run(["bash", str(SBATCH), *command], env=full_env, capture_output=True, text=True,
                            check=False, timeout=60)
    calls = log.read_text().splitlines() if log.exists() else []
    return result, calls


def test_multinode_job_starts_head_and_workers_then_runs_on_the_head(tmp_path: Path, stub_path: Path) -> None:
    out_file = tmp_path / "address.txt"
    result, calls = _run_sbatch(tmp_path, stub_path, ["sh", "-c", f'echo "$RAY_ADDRESS" > {out_file}'],
                                nodes=3, alive=3)
    assert result.returncode == 0, result.stderr
    assert out_file.read_text().strip() == "10.1.2.3:6379"
    assert calls[0] == "scontrol show hostnames gpu-[a-c]"
    assert calls[1] == ("ray start --head --node-ip-address=10.1.2.3 --port=6379 --disable-usage-stats "
                        "--num-gpus=8 --num-cpus=64")
    worker = next(call for call in calls if call.startswith("srun "))
    assert worker == ("srun --overlap --nodes=2 --ntasks=2 --ntasks-per-node=1 --exclude=gpu-a ray start "
                      "--address=10.1.2.3:6379 --disable-usage-stats --block --num-gpus=8 --num-cpus=64")
    assert "ray status --address=10.1.2.3:6379" in calls
    assert calls[-1] == "ray stop --force"
    assert "3/3 nodes joined" in result.stderr


def test_command_failure_is_the_job_status_and_ray_still_stops(tmp_path: Path, stub_path: Path) -> None:
    result, calls = _run_sbatch(tmp_path, stub_path, ["sh", "-c", "exit 7"], nodes=2, alive=2,
                                FTRL_RAY_PORT="7000")
    assert result.returncode == 7
    assert "command exited with status 7" in result.stderr
    assert any("--port=7000" in call for call in calls) and calls[-1] == "ray stop --force"


def test_nodes_that_never_join_fail_the_job_before_the_command(tmp_path: Path, stub_path: Path) -> None:
    marker = tmp_path / "ran"
    result, calls = _run_sbatch(tmp_path, stub_path, ["touch", str(marker)], nodes=3, alive=1,
                                FTRL_RAY_WAIT_S="0")
    assert result.returncode != 0 and not marker.exists()
    assert "only 1/3 nodes joined within 0s" in result.stderr
    assert calls[-1] == "ray stop --force"


def test_single_node_job_runs_without_a_ray_cluster(tmp_path: Path, stub_path: Path) -> None:
    out_file = tmp_path / "out.txt"
    result, calls = _run_sbatch(tmp_path, stub_path, ["sh", "-c", f'echo "x${{RAY_ADDRESS:-}}" > {out_file}'],
                                nodes=1, alive=0)
    assert result.returncode == 0, result.stderr
    assert out_file.read_text().strip() == "x" and calls == []


def test_head_node_workers_start_a_cluster_even_on_one_node(tmp_path: Path, stub_path: Path) -> None:
    out_file = tmp_path / "address.txt"
    result, calls = _run_sbatch(tmp_path, stub_path, ["sh", "-c", f'echo "$RAY_ADDRESS" > {out_file}'],
                                nodes=1, alive=2, FTRL_RAY_HEAD_NODE_WORKERS="1", FTRL_RAY_HEAD_IP="127.0.0.1",
                                FTRL_RAY_HEAD_ARGS="--include-dashboard=false")
    assert result.returncode == 0, result.stderr
    assert out_file.read_text().strip() == "127.0.0.1:6379"
    assert calls[1] == ("ray start --head --node-ip-address=127.0.0.1 --port=6379 --disable-usage-stats "
                        "--num-gpus=8 --num-cpus=64 --include-dashboard=false")
    sruns = [call for call in calls if call.startswith("srun ")]
    assert sruns == [("srun --overlap --nodes=1 --ntasks=1 --ntasks-per-node=1 --nodelist=gpu-a ray start "
                      "--address=127.0.0.1:6379 --node-ip-address=127.0.0.1 --disable-usage-stats --block "
                      "--num-gpus=8 --num-cpus=64")]
    assert "2/2 nodes joined" in result.stderr and calls[-1] == "ray stop --force"


def test_sbatch_without_a_command_prints_usage(tmp_path: Path, stub_path: Path) -> None:
    result, _ = _run_sbatch(tmp_path, stub_path, [], nodes=2, alive=2)
    assert result.returncode == 2 and "usage:" in result.stderr


# ------------------------------------------------------------------------------------ wandb_sync
def _offline_run(root: Path, job: str, run_id: str, synced: bool = False) -> Path:
    run = root / job / "wandb" / f"offline-run-20260101_000000-{run_id}"
    run.mkdir(parents=True)
    (run / f"run-{run_id}.wandb").write_bytes(b":W&B")
    if synced:
        (run / f"run-{run_id}.wandb.synced").write_text("")
    return run


def _sync(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(WANDB_SYNC), *args], cwd=cwd, capture_output=True, text=True,
                          check=False, timeout=60)


def test_wandb_sync_dry_run_lists_only_unsynced_runs(tmp_path: Path) -> None:
    outputs = tmp_path / "outputs"
    first = _offline_run(outputs, "multirun/x/freeze=none", "aaa")
    _offline_run(outputs, "multirun/x/freeze=mlp_only", "bbb", synced=True)
    third = _offline_run(outputs, "qwen8b_grpo/base", "ccc")
    (outputs / "other" / "offline-run-not-in-a-wandb-dir").mkdir(parents=True)
    result = _sync("--dry-run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "[wandb_sync] 2 offline run(s) to sync under outputs"
    assert lines[1] == f"wandb sync {first.relative_to(tmp_path)} {third.relative_to(tmp_path)}"
    again = _sync("--dry-run", "--include-synced", "--project", "ftrl-paper", cwd=tmp_path)
    assert again.stdout.splitlines()[0].startswith("[wandb_sync] 3 offline run(s)")
    assert again.stdout.splitlines()[1].startswith("wandb sync --project ftrl-paper ")


def test_wandb_sync_calls_wandb_in_batches(tmp_path: Path) -> None:
    for index in range(3):
        _offline_run(tmp_path / "outputs", f"job{index}", f"id{index}")
    log = tmp_path / "wandb_calls.log"
    fake = tmp_path / "fake_wandb"
    fake.write_text(f'#!/bin/sh\necho "$*" >> {log}\n')
    fake.chmod(0o755)
    result = _sync("--batch", "2", "--entity", "team", "--wandb-bin", str(fake), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    calls = log.read_text().splitlines()
    assert len(calls) == 2
    assert calls[0].startswith("sync --entity team outputs/job0/wandb/offline-run-")
    assert calls[0].count("offline-run-") == 2 and calls[1].count("offline-run-") == 1


def test_wandb_sync_rejects_a_missing_root(tmp_path: Path) -> None:
    result = _sync("--root", "nowhere", cwd=tmp_path)
    assert result.returncode == 2 and "nowhere" in result.stderr
