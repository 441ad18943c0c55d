"""tau-bench tools/codes/DB imported as a stateful environment family (data from a configured directory).

The data directory is /work/shared/data (beside the project) as the tests' setting; the product reads
it only through envs.taubench.data_dir or FTRL_DATA_DIR.

    OMP_NUM_THREADS=1 python -m pytest tests/test_taubench_import.py -q
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ftrl.config import RunConfig, TauBenchConfig
from ftrl.envs.executor import StatefulExecutor, TurnContext, run_stateful_calls
from ftrl.envs.io import validate_record
from ftrl.envs.taubench import build_taubench_envs, load_domain, resolve_data_dir
from ftrl.reward import apply_tool_results
from ftrl.types import count_answers

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
USER = "noah_brown_6181"
NEW_ADDRESS = {
    "address1": "1 Test Way",
    "address2": "Unit 7",
    "city": "Testville",
    "state": "TX",
    "country": "USA",
    "zip": "00001",
}


def _call(call_id: str, name: str, **arguments) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


@pytest.fixture(scope="module")
def retail() -> tuple[dict, object]:
    records, report = build_taubench_envs(
        TauBenchConfig(data_dir=str(DATA), domains=["retail"], max_tasks=6, test_fraction=0.0)
    )
    return records, report


def test_import_builds_valid_reference_records(retail) -> None:
    records, report = retail
    assert (report.tasks, report.kept, report.no_actions, report.gold_error) == (6, 6, 0, 0)
    assert len(records["train"]) == 6 and records["test"] == []
    domain = load_domain(DATA, "retail")
    for index, record in enumerate(records["train"]):
        validate_record(record, f"retail #{index}")
        assert record["data_source"] == "tau-bench/retail"
        assert [m["role"] for m in record["messages"]] == ["system", "user"]
        assert record["messages"][0]["content"].startswith("# Retail agent policy")
        assert json.loads(record["state"]) == {
            "family": "taubench",
            "domain": "retail",
            "db_sha256": domain.db_sha256,
        }
        assert {t["function"]["name"] for t in json.loads(record["tools"])} == set(
            json.loads(record["codes"])
        )
        turns = json.loads(record["gold_calls"])
        assert all(len(turn) == 1 for turn in turns)  # one action per turn, in the task's order
        assert count_answers(json.loads(record["unsolved_set"])) == len(turns)


def test_gold_chain_replayed_turn_by_turn_solves_every_sub_answer(retail) -> None:
    records, _ = retail
    executor = StatefulExecutor(data_dir=str(DATA))
    for record in records["train"]:
        unsolved = json.loads(record["unsolved_set"])
        history = list(record["messages"])
        for number, turn in enumerate(json.loads(record["gold_calls"])):
            calls = [_call(f"c{number}_{i}", c["name"], **c["arguments"]) for i, c in enumerate(turn)]
            outputs = executor([(json.loads(record["codes"]), calls, TurnContext(record, history))])[0]
            apply_tool_results(calls, outputs, unsolved)
            history += [{"role": "assistant", "content": "", "tool_calls": calls}] + [
                {"role": "tool", "content": o, "tool_call_id": c["id"]} for c, o in zip(calls, outputs)
            ]
        assert count_answers(unsolved) == 0, record["messages"][1]["content"][:80]
    assert executor.replay_mismatches == 0


def test_a_write_is_seen_by_later_turns_of_its_episode_only(retail) -> None:
    records, _ = retail
    record = records["train"][0]
    codes = json.loads(record["codes"])
    original = load_domain(DATA, "retail").db["users"][USER]["address"]
    executor = StatefulExecutor(data_dir=str(DATA))
    base = list(record["messages"])
    write = _call("w1", "modify_user_address", user_id=USER, **NEW_ADDRESS)
    read = _call("r1", "get_user_details", user_id=USER)

    # Turn 1 of episode A writes; in the same batch, episode B reads (another job, another copy).
    written, read_in_b = executor(
        [(codes, [write], TurnContext(record, base)), (codes, [read], TurnContext(record, base))]
    )
    assert json.loads(written[0])["address"] == NEW_ADDRESS
    assert json.loads(read_in_b[0])["address"] == original
    history_a = base + [
        {"role": "assistant", "content": "", "tool_calls": [write]},
        {"role": "tool", "content": written[0], "tool_call_id": "w1"},
    ]
    # Turn 2 of episode A sees its write; a fresh episode C, run in the same batch, does not.
    turn2_a, fresh_c = executor(
        [
            (codes, [read], TurnContext(record, history_a)),
            (codes, [_call("r2", "get_user_details", user_id=USER)], TurnContext(record, base)),
        ]
    )
    assert json.loads(turn2_a[0])["address"] == NEW_ADDRESS
    assert json.loads(fresh_c[0])["address"] == original
    assert load_domain(DATA, "retail").db["users"][USER]["address"] == original  # the loaded DB is untouched
    # A snapshot record (history in its messages) is scored the same way, e.g. by the reward.
    snapshot = {**record, "messages": history_a}
    assert json.loads(run_stateful_calls(snapshot, [read], data_dir=str(DATA))[0])["address"] == NEW_ADDRESS
    assert executor.replay_mismatches == 0


def test_stateless_jobs_pass_through_unchanged() -> None:
    codes = {"echo": "def echo(x):\n    return {'x': x}\n"}
    outputs = StatefulExecutor()(
        [
            (codes, [_call("a", "echo", x=1)]),
            (codes, [_call("b", "echo", x=2)], TurnContext({"messages": []}, [])),
        ]
    )
    assert outputs == [['{"x": 1}'], ['{"x": 2}']]


def test_data_dir_comes_from_config_or_environment(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("FTRL_DATA_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match="envs.taubench.data_dir .*FTRL_DATA_DIR"):
        resolve_data_dir(None)
    with pytest.raises(FileNotFoundError, match="has no tau-bench/ directory"):
        resolve_data_dir(str(tmp_path))
    monkeypatch.setenv("FTRL_DATA_DIR", str(DATA))
    assert resolve_data_dir(None) == DATA

    from ftrl.envs.sources import taubench

    cfg = RunConfig()
    cfg.envs.name = "taubench"
    cfg.envs.taubench.domains = ["airline"]
    cfg.envs.taubench.max_tasks = 3
    cfg.validate()
    splits = taubench(cfg)
    assert sum(len(rows) for rows in splits.values()) == 3
    assert {r["data_source"] for rows in splits.values() for r in rows} == {"tau-bench/airline"}
    assert splits.manifest["import"]["kept"] == 3


def test_a_different_database_is_refused_and_embedding_makes_records_self_contained(
    retail, tmp_path: Path
) -> None:
    records, _ = retail
    record = records["train"][0]
    copy_root = tmp_path / "data"
    shutil.copytree(DATA / "tau-bench" / "retail", copy_root / "tau-bench" / "retail")
    users = json.loads((copy_root / "tau-bench/retail/users.json").read_text())
    users[USER]["email"] = "changed@example.com"
    (copy_root / "tau-bench/retail/users.json").write_text(json.dumps(users))
    read = _call("r", "get_user_details", user_id=USER)
    with pytest.raises(ValueError, match="was built on .* rebuild the environments"):
        StatefulExecutor(data_dir=str(copy_root))(
            [(json.loads(record["codes"]), [read], TurnContext(record, record["messages"]))]
        )

    (copy_root / "tau-bench/tasks.jsonl").write_text((DATA / "tau-bench/tasks.jsonl").read_text())
    embedded, _ = build_taubench_envs(
        TauBenchConfig(
            data_dir=str(copy_root), domains=["retail"], max_tasks=1, embed_db=True, test_fraction=0.0
        )
    )
    [one] = embedded["train"]
    shutil.rmtree(copy_root)  # nothing on disk is needed any more
    output = StatefulExecutor(data_dir=None)(
        [(json.loads(one["codes"]), [read], TurnContext(one, one["messages"]))]
    )
    assert json.loads(output[0][0])["email"] == "changed@example.com"
