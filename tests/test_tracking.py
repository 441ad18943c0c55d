"""W&B tracking: real offline runs in a tmp dir, read back from the run file that `wandb sync` uploads.

Each test that opens a run checks what W&B recorded (group, job type, tags, history, exit code) by
parsing ``run-<id>.wandb``: a log of protobuf ``Record`` messages in 32 KiB blocks, each chunk with
a 7-byte header (crc32, little-endian length, chunk type 1 full / 2 first / 3 middle / 4 last).

    OMP_NUM_THREADS=1 python -m pytest tests/test_tracking.py -q
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from ftrl.config import STAGES, RunConfig
from ftrl.tracking import (
    Tracker,
    config_tags,
    job_type_for,
    read_verl_metrics_file,
    run_id_for,
    run_name_for,
    verl_metrics_to_ftrl,
    wandb_enabled,
)

BLOCK = 32 * 1024
HEADER = 7


def _records(path: Path) -> Iterator[Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, pending = HEADER, b""
    while position + HEADER <= len(data):
        left_in_block = BLOCK - position % BLOCK
        if left_in_block < HEADER:  # block trailer padding
            position += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position:position + HEADER])
        if length == 0 and kind == 0:
            position += left_in_block
            continue
        pending += data[position + HEADER:position + HEADER + length]
        position += HEADER + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _read_run(run_dir: Path) -> dict[str, Any]:
    """The run header, history rows, summary and exit code of the single offline run under ``run_dir``.

    ``run.finish()`` returns before wandb's service process has necessarily written the last
    records; ``wandb.teardown()`` waits for that process to flush and exit.
    """
    import wandb

    wandb.teardown()
    files = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    out: dict[str, Any] = {"history": [], "summary": {}, "exit_code": None}
    for record in _records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["run"] = record.run
        elif kind == "history":
            # Keys with "/" are stored split into nested_key.
            out["history"].append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                   for item in record.history.item})
        elif kind == "summary":
            out["summary"].update({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                   for item in record.summary.update})
        elif kind == "exit":
            out["exit_code"] = record.exit.exit_code
    return out


@pytest.fixture()
def offline_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """W&B offline, with its config/cache dirs inside tmp_path (nothing written to $HOME)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for key in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(key, str(tmp_path / "wandb-home" / key.lower()))
    return tmp_path


def _config(run_dir: Path, **changes: Any) -> RunConfig:
    cfg = OmegaConf.structured(RunConfig)
    cfg.run_dir = str(run_dir)
    cfg.name = "tiny_freeze_ablation"
    cfg.logger.name = "wandb"
    cfg.logger.wandb.mode = "offline"
    cfg.logger.wandb.tags = ["sweep:demo"]
    for key, value in changes.items():
        OmegaConf.update(cfg, key, value)
    return OmegaConf.to_object(cfg)


# ----------------------------------------------------------------------------------- pure helpers
def test_job_type_names_the_stage_set() -> None:
    assert job_type_for(list(STAGES)) == "pipeline"
    assert job_type_for(["eval"]) == "eval"
    assert job_type_for(["collect", "train"]) == "collect+train"


def test_run_id_is_stable_per_run_dir_and_job_type(tmp_path: Path) -> None:
    assert run_id_for(str(tmp_path / "a"), "pipeline") == run_id_for(str(tmp_path / "a"), "pipeline")
    assert run_id_for(str(tmp_path / "a"), "pipeline") != run_id_for(str(tmp_path / "a"), "eval")
    assert run_id_for(str(tmp_path / "a"), "pipeline") != run_id_for(str(tmp_path / "b"), "pipeline")
    assert len(run_id_for("x", "eval")) == 16


def test_run_name_is_the_multirun_leaf_or_the_experiment(tmp_path: Path) -> None:
    assert run_name_for(_config(tmp_path / "freeze=mlp_only"), "pipeline") == "freeze=mlp_only"
    assert run_name_for(_config(tmp_path / "base"), "eval") == "tiny_freeze_ablation [eval]"


def test_tags_are_the_chosen_group_options(tmp_path: Path) -> None:
    tags = config_tags(_config(tmp_path, **{"freeze.name": "mlp_only", "algorithm.name": "ppo"}))
    assert tags == ["model:tiny", "mode:non_reasoning", "algorithm:ppo", "reward:solve_f1", "freeze:mlp_only",
                    "envs:procedural", "backend:native", "peft:none", "train:tiny", "resources:cpu"]


def test_wandb_is_off_for_console_logger_disabled_mode_and_env(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert wandb_enabled(_config(tmp_path))
    assert not wandb_enabled(_config(tmp_path, **{"logger.name": "console"}))
    assert not wandb_enabled(_config(tmp_path, **{"logger.wandb.mode": "disabled"}))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    tracker = Tracker(_config(tmp_path / "run"))
    tracker.log({"reward/score": 1.0}, step=1)
    tracker.finish()
    assert tracker.wandb_run is None and not (tmp_path / "run" / "wandb").exists()


def test_verl_names_map_to_the_shared_names() -> None:
    mapped = verl_metrics_to_ftrl({
        "critic/score/mean": 0.25, "response_length/mean": 100, "response_length/clip_ratio": 0.5,
        "actor/kl_loss": 0.01, "critic/values/mean": 2.0, "perf/time_per_step": 4.0,
        "perf/total_num_tokens": 1000, "critic/score/max": 1.0, "training/epoch": 0, "note": "text",
    })
    assert mapped == {
        "reward/score": 0.25, "response/length_mean": 100.0, "response/truncated": 0.5, "actor/kl_loss": 0.01,
        "critic/values_mean": 2.0, "perf/step_s": 4.0, "verl/perf/total_num_tokens": 1000.0,
        "verl/critic/score/max": 1.0, "verl/training/epoch": 0.0, "perf/tokens_per_s": 250.0,
    }


# ----------------------------------------------------------------------------------- real offline runs
def test_offline_run_has_group_job_type_tags_and_metrics(offline_wandb: Path) -> None:
    run_dir = offline_wandb / "outputs" / "freeze=mlp_only"
    cfg = _config(run_dir, stages=["eval"], **{"freeze.name": "mlp_only"})
    with Tracker(cfg) as tracker:
        tracker.log({"reward/score": 0.5}, step=3)
        tracker.summary({"ftrl_test/solve_f1": 0.75})
    run = _read_run(run_dir)
    assert run["run"].run_group == "tiny_freeze_ablation"
    assert run["run"].job_type == "eval"
    assert run["run"].display_name == "freeze=mlp_only [eval]"
    assert run["run"].run_id == run_id_for(str(run_dir), "eval")
    assert "freeze:mlp_only" in run["run"].tags and "sweep:demo" in run["run"].tags
    assert {"reward/score": 0.5, "trainer/global_step": 3}.items() <= run["history"][0].items()
    assert run["exit_code"] == 0
    assert run["summary"]["ftrl_test/solve_f1"] == 0.75


def test_run_is_finished_with_exit_code_1_when_the_job_fails(offline_wandb: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import wandb

    import ftrl.pipeline
    import ftrl.run

    def failing_pipeline(cfg: RunConfig, tracker: Tracker, overrides: list[str] | None = None) -> dict:
        tracker.log({"reward/score": 0.1}, step=1)
        raise RuntimeError("collect crashed")

    monkeypatch.setattr(ftrl.pipeline, "run_pipeline", failing_pipeline)
    run_dir = offline_wandb / "run"
    cfg = OmegaConf.structured(_config(run_dir))
    with pytest.raises(RuntimeError, match="collect crashed"):
        ftrl.run.main(cfg)
    assert wandb.run is None
    run = _read_run(run_dir)
    assert run["exit_code"] == 1 and run["run"].job_type == "pipeline"


def test_each_multirun_job_gets_its_own_run_in_one_group(offline_wandb: Path) -> None:
    ids = []
    for policy in ("none", "mlp_only"):
        run_dir = offline_wandb / "multirun" / f"freeze={policy}"
        with Tracker(_config(run_dir, **{"freeze.name": policy})) as tracker:
            tracker.log({"reward/score": 1.0}, step=1)
        run = _read_run(run_dir)
        assert run["run"].run_group == "tiny_freeze_ablation" and f"freeze:{policy}" in run["run"].tags
        ids.append(run["run"].run_id)
    assert len(set(ids)) == 2


def test_verl_file_logger_output_replays_under_shared_names(offline_wandb: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from verl.utils.tracking import FileLogger

    metrics_file = offline_wandb / "verl_metrics.jsonl"
    monkeypatch.setenv("VERL_FILE_LOGGER_PATH", str(metrics_file))
    verl_logger = FileLogger("ftrl", "round2")
    verl_logger.log({"critic/score/mean": 0.2, "actor/pg_loss": -0.1}, step=1)
    verl_logger.log({"critic/score/mean": 0.4, "actor/pg_loss": -0.2}, step=2)
    verl_logger.finish()
    assert [step for step, _ in read_verl_metrics_file(metrics_file)] == [1, 2]

    run_dir = offline_wandb / "run"
    from ftrl.train.verl_backend import history_rows

    with Tracker(_config(run_dir)) as tracker:  # as the verl backend replays a finished round
        for row in history_rows(metrics_file, k=2, step_offset=10):
            tracker.log({key: v for key, v in row.items() if isinstance(v, float)}, step=row["global_step"])
    rows = _read_run(run_dir)["history"]
    assert [(row["reward/score"], row["actor/pg_loss"], row["trainer/global_step"]) for row in rows] == [
        (0.2, -0.1, 11), (0.4, -0.2, 12)]


def test_bad_verl_metrics_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1, "data": {}}\n{"oops": 1}\n')
    with pytest.raises(ValueError, match=r"m\.jsonl:2"):
        list(read_verl_metrics_file(path))


def test_wandb_added_to_a_finished_run_replays_its_metrics_once(offline_wandb: Path) -> None:
    from ftrl.artifacts import RunDir, write_json, write_manifest
    from ftrl.config import to_container
    from ftrl.run import _settle_wandb

    run_dir = offline_wandb / "finished"
    rd = RunDir(run_dir)
    cfg = _config(run_dir)
    write_manifest(rd, to_container(cfg))
    rd.warmup_history.parent.mkdir(parents=True)
    rd.warmup_history.write_text("".join(json.dumps({"step": s, "warmup/loss": 3.0 - s}) + "\n" for s in (1, 2)))
    rd.train_history(1).parent.mkdir(parents=True)
    rd.train_history(1).write_text(json.dumps({"step": 1, "global_step": 1, "reward/score": 0.25}) + "\n")
    write_json(rd.eval_summary, {"round1": {"ftrl_test/solve_f1": 0.5}})

    with Tracker(cfg) as tracker:  # nothing ran in this job
        _settle_wandb(tracker, str(run_dir))
    rows = _read_run(run_dir)["history"]
    assert [row.get("warmup/loss") for row in rows[:2]] == [2.0, 1.0]
    assert rows[2]["reward/score"] == 0.25 and rows[2]["trainer/global_step"] == 1
    assert rows[3]["eval/round1/ftrl_test/solve_f1"] == 0.5
    replayed = json.loads(rd.manifest.read_text())["wandb_replayed"]
    assert replayed == [run_id_for(str(run_dir), "pipeline")]

    with Tracker(cfg) as tracker:  # the same W&B run already holds them: nothing is sent twice
        _settle_wandb(tracker, str(run_dir))
        assert tracker.logged == 0
