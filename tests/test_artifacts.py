"""Atomic writes and the run-directory layout of ftrl.artifacts.

    python -m pytest tests/test_artifacts.py -q
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from ftrl.artifacts import (
    HISTORY_JSONL,
    REWARD_CURVE_PNG,
    TRAINER_STATE_PT,
    RunDir,
    atomic_dir,
    atomic_path,
    atomic_write,
    atomic_write_bytes,
    atomic_write_text,
    write_json,
)


def leftovers(directory: Path) -> list[str]:
    """Everything but the expected files: temporary names all start with '.'."""
    return sorted(path.name for path in directory.rglob(".*"))


class Boom(RuntimeError):
    pass


# ------------------------------------------------------------------------------- atomic_write
@pytest.mark.parametrize("fsync", [False, True])
def test_atomic_write_writes_the_content_and_leaves_no_temp_file(tmp_path: Path, fsync: bool) -> None:
    target = tmp_path / "sub" / "out.txt"  # the parent is created
    with atomic_write(target, fsync=fsync) as handle:
        handle.write("héllo\n")
        assert not target.exists()  # nothing visible until the block ends
    assert target.read_text(encoding="utf-8") == "héllo\n"
    assert leftovers(tmp_path) == []


def test_atomic_write_binary_and_newline(tmp_path: Path) -> None:
    with atomic_write(tmp_path / "b.bin", "wb") as handle:
        handle.write(b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    with atomic_write(tmp_path / "n.csv", newline="") as handle:
        handle.write("a\r\nb\n")
    assert (tmp_path / "n.csv").read_bytes() == b"a\r\nb\n"
    with pytest.raises(ValueError), atomic_write(tmp_path / "x", "a"):
        pass


def test_atomic_write_keeps_the_old_file_on_an_exception(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    target.write_text("old", encoding="utf-8")
    with pytest.raises(Boom), atomic_write(target) as handle:
        handle.write("half a fi")
        raise Boom
    assert target.read_text(encoding="utf-8") == "old"
    assert leftovers(tmp_path) == []


def test_atomic_write_creates_nothing_on_an_exception(tmp_path: Path) -> None:
    with pytest.raises(Boom), atomic_write(tmp_path / "new.txt") as handle:
        handle.write("x")
        raise Boom
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_text_bytes_and_write_json(tmp_path: Path) -> None:
    assert atomic_write_text(tmp_path / "t.txt", "one") == tmp_path / "t.txt"
    atomic_write_text(tmp_path / "t.txt", "two")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "two"
    atomic_write_bytes(tmp_path / "b.bin", b"abc")
    assert (tmp_path / "b.bin").read_bytes() == b"abc"
    write_json(tmp_path / "d" / "x.json", {"a": "é"})
    assert (tmp_path / "d" / "x.json").read_text(encoding="utf-8") == '{\n  "a": "é"\n}\n'
    assert leftovers(tmp_path) == []


def test_atomic_write_temp_names_differ_between_threads(tmp_path: Path) -> None:
    target = tmp_path / "shared.txt"
    names: list[str] = []
    barrier = threading.Barrier(4)

    def writer(index: int) -> None:
        with atomic_write(target) as handle:
            names.append(Path(handle.name).name)
            barrier.wait()  # all four temporary files are open at once
            handle.write(f"writer {index}")

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(names)) == 4 and all(name.startswith(".shared.txt.") for name in names)
    assert target.read_text(encoding="utf-8").startswith("writer ")
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------------------------- atomic_path
def test_atomic_path_renames_what_the_writer_wrote(tmp_path: Path) -> None:
    target = tmp_path / "table.parquet"
    with atomic_path(target, fsync=True) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        tmp.write_bytes(b"data")
    assert target.read_bytes() == b"data"
    assert leftovers(tmp_path) == []


def test_atomic_path_keeps_the_old_file_on_an_exception(tmp_path: Path) -> None:
    target = tmp_path / "state.pt"
    target.write_bytes(b"old")
    with pytest.raises(Boom), atomic_path(target) as tmp:
        tmp.write_bytes(b"new, half")
        raise Boom
    assert target.read_bytes() == b"old"
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------------------------- atomic_dir
def test_atomic_dir_replaces_an_existing_directory(tmp_path: Path) -> None:
    target = tmp_path / "checkpoint"
    target.mkdir()
    (target / "stale.bin").write_bytes(b"old")
    with atomic_dir(target) as staging:
        assert staging.is_dir() and not any(staging.iterdir())
        (staging / "model.safetensors").write_bytes(b"new")
    assert sorted(p.name for p in target.iterdir()) == ["model.safetensors"]
    assert leftovers(tmp_path) == []


def test_atomic_dir_keep_leaves_a_directory_that_appeared_meanwhile(tmp_path: Path) -> None:
    target = tmp_path / "set-abc"
    with atomic_dir(target, if_exists="keep") as staging:
        (staging / "train.jsonl").write_text("mine\n", encoding="utf-8")
        target.mkdir()  # another process stored the same content meanwhile
        (target / "train.jsonl").write_text("theirs\n", encoding="utf-8")
    assert (target / "train.jsonl").read_text(encoding="utf-8") == "theirs\n"
    assert leftovers(tmp_path) == []


def test_atomic_dir_keeps_the_old_directory_on_an_exception(tmp_path: Path) -> None:
    target = tmp_path / "checkpoint"
    target.mkdir()
    (target / "weights.bin").write_bytes(b"old")
    with pytest.raises(Boom), atomic_dir(target) as staging:
        (staging / "weights.bin").write_bytes(b"half")
        raise Boom
    assert (target / "weights.bin").read_bytes() == b"old"
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------------------------- layout
def test_run_dir_names(tmp_path: Path) -> None:
    rd = RunDir(tmp_path)
    assert rd.train_history(2) == tmp_path / "rounds" / "r2" / "train" / HISTORY_JSONL
    assert rd.trainer_state(1) == rd.train_dir(1) / TRAINER_STATE_PT
    assert rd.warmup_history == tmp_path / "warmup" / "history.jsonl"
    assert rd.reward_curve == tmp_path / REWARD_CURVE_PNG
    assert rd.analysis_comparison_dir("base", "round1") == tmp_path / "analysis" / "base_to_round1"
    rd.mark_done("collect", n=1)
    assert json.loads(rd.stage_marker("collect").read_text())["n"] == 1
    assert leftovers(tmp_path) == []


def test_unused_environment_sources_do_not_change_a_runs_identity(tmp_path: Path) -> None:
    from ftrl.artifacts import RunDirConflict, write_manifest
    from ftrl.config import RunConfig, to_container

    config = to_container(RunConfig())
    rd = RunDir(tmp_path)
    write_manifest(rd, config)
    # An older manifest recorded every source's section (and older defaults for the unused ones).
    manifest = json.loads(rd.manifest.read_text())
    manifest["identity"]["envs"]["llm"] = {"functional_generalization": 0.0}
    manifest["config_hash"] = "written-by-older-rules"
    rd.manifest.write_text(json.dumps(manifest))
    write_manifest(rd, config)  # envs=procedural: envs.llm is not part of the run
    changed = json.loads(json.dumps(config))
    changed["envs"]["procedural"]["num_train"] = 7
    with pytest.raises(RunDirConflict, match=r"envs\.procedural\.num_train: 400 -> 7"):
        write_manifest(rd, changed)


def test_critic_settings_are_part_of_a_run_only_when_it_has_a_critic(tmp_path: Path) -> None:
    from ftrl.artifacts import RunDirConflict, write_manifest
    from ftrl.config import RunConfig, to_container

    config = to_container(RunConfig())  # GRPO
    assert config["algorithm"]["use_critic"] is False
    rd = RunDir(tmp_path / "grpo")
    write_manifest(rd, config)
    manifest = json.loads(rd.manifest.read_text())
    assert not any(key.startswith("critic_") for key in manifest["identity"]["train"])
    # a GRPO run made before train.critic_carry_over existed resumes under today's config
    config["train"]["critic_carry_over"] = not config["train"]["critic_carry_over"]
    write_manifest(rd, config)
    ppo = json.loads(json.dumps(config))
    ppo["algorithm"].update(name="ppo", adv_estimator="gae", use_critic=True)
    rd = RunDir(tmp_path / "ppo")
    write_manifest(rd, ppo)
    ppo["train"]["critic_carry_over"] = not ppo["train"]["critic_carry_over"]
    with pytest.raises(RunDirConflict, match=r"train\.critic_carry_over"):
        write_manifest(rd, ppo)
