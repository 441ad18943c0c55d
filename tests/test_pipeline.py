"""End to end through ``python -m ftrl.run``: every stage on the smoke config, resume, a local sweep."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ftrl.run", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    run_dir = tmp_path_factory.mktemp("smoke") / "run"
    result = _run("+debug=smoke", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir, result


@pytest.mark.slow
def test_smoke_run_writes_every_stage(smoke_run) -> None:
    run_dir, result = smoke_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [e["checkpoint"] for e in summary["evals"]] == ["base", "warmup", "round1", "round2"]
    assert summary["hacking_monitor"] == {"fired": False, "alarms": []}  # the smoke model makes no calls at all
    for entry in summary["evals"]:
        assert {"ftrl_test/solve_p", "ftrl_test/solve_r", "ftrl_test/solve_f1"} <= set(entry["metrics"])
    for name in ("train", "test"):
        assert (run_dir / "envs" / f"{name}.jsonl").stat().st_size > 0
    for k in (1, 2):
        assert (run_dir / "rounds" / f"r{k}" / "snapshots.parquet").exists()
        assert (run_dir / "rounds" / f"r{k}" / "checkpoint" / "model.safetensors").exists()
        history = (run_dir / "rounds" / f"r{k}" / "train" / "history.jsonl").read_text().splitlines()
        row = json.loads(history[-1])
        for key in ("reward/score", "reward/calls", "actor/kl_loss", "actor/entropy", "actor/pg_clipfrac",
                    "response/length_mean", "rollout/tool_calls_per_turn", "perf/tokens_per_s"):
            assert key in row
    header = (run_dir / "analysis" / "param_delta.csv").read_text().splitlines()[0]
    assert header == "name,layer,module,numel,rel_change"
    assert (run_dir / "analysis" / "param_delta_heatmap.png").stat().st_size > 1000
    assert (run_dir / "train_reward_curve.png").stat().st_size > 1000
    assert "Solve-F1" in result.stdout and f"run directory: {run_dir}" in result.stdout


@pytest.mark.slow
def test_rerun_resumes_and_skips_every_finished_step(smoke_run) -> None:
    run_dir, _ = smoke_run
    before = (run_dir / "summary.json").read_text()
    again = _run("+debug=smoke", f"hydra.run.dir={run_dir}")
    assert again.returncode == 0, again.stderr[-2000:]
    log = again.stdout + again.stderr
    for step in ("build_envs", "warmup", "collect_r1", "train_r1", "collect_r2", "train_r2", "analyze"):
        assert f"skip {step}" in log
    assert json.loads((run_dir / "summary.json").read_text())["evals"] == json.loads(before)["evals"]


@pytest.mark.slow
def test_changed_config_is_refused_in_an_existing_run_dir(smoke_run) -> None:
    run_dir, _ = smoke_run
    result = _run("+debug=smoke", "algorithm=ppo", f"hydra.run.dir={run_dir}")
    assert result.returncode != 0
    assert "different configuration" in result.stdout + result.stderr
    assert "algorithm.name: 'grpo' -> 'ppo'" in result.stdout + result.stderr


@pytest.mark.slow
def test_local_sweep_gives_each_job_its_own_run(tmp_path: Path) -> None:
    result = _run("-m", "algorithm=grpo,reinforce_pp", "+debug=smoke", "train.rounds=1",
                  "stages=[build_envs,collect,train,eval]", f"hydra.sweep.dir={tmp_path}", timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    jobs = sorted(p.name for p in tmp_path.iterdir() if (p / "manifest.json").exists())
    # ``stages`` is left out of the name (it does not change results); the rest keep their CLI order.
    assert jobs == ["debug=smoke,algorithm=grpo,train.rounds=1",
                    "debug=smoke,algorithm=reinforce_pp,train.rounds=1"], jobs
    # the sweep-level comparison sits beside the jobs, not among them
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir() and p.name not in jobs) == ["comparison"]
    assert (tmp_path / "comparison" / "comparison.md").exists()
    for job in tmp_path.iterdir():
        if job.name in jobs:
            summary = json.loads((job / "summary.json").read_text())
            assert [e["checkpoint"] for e in summary["evals"]] == ["base", "warmup", "round1"]
