"""Snapshot collection and own-test evaluation with a scripted policy: record format, metrics, resume."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ftrl.collect import EpisodeLog, collect_snapshots, run_episodes
from ftrl.config import ProceduralConfig
from ftrl.envs.executor import StatefulExecutor
from ftrl.envs.procedural import build_procedural_envs
from ftrl.eval.own_test import aggregate_by_scenario, evaluate_own_test
from ftrl.llm.engines.base import ChatEngine, ChatRequest, Generation, SamplingParams
from ftrl.llm.parsers import get_parser
from ftrl.train.warmup import final_answer_text, format_tool_calls
from ftrl.types import REFERENCE_FIELDS


class ScriptedEngine(ChatEngine):
    """Plays each environment's gold chain; ``wrong_first`` makes it call a wrong id once first."""

    def __init__(self, records: list[dict], wrong_first: bool = False) -> None:
        self.by_question = {r["messages"][0]["content"]: r for r in records}
        self.wrong_first = wrong_first
        self.calls = 0

    def render(self, request: ChatRequest) -> str:
        return request.messages[0]["content"]

    def generate(self, requests, params):
        outputs = []
        for request in requests:
            self.calls += 1
            record = self.by_question[request.messages[0]["content"]]
            turns = json.loads(record["gold_calls"])
            done = sum(1 for m in request.messages if m["role"] == "assistant")
            if self.wrong_first:
                if done == 0:
                    bad = [{"name": turns[0][0]["name"], "arguments": {"nope": 1}}]
                    outputs.append([Generation(format_tool_calls(bad), [], [], "stop")])
                    continue
                done -= 1
            text = format_tool_calls(turns[done]) if done < len(turns) else final_answer_text(record["answer"])
            outputs.append([Generation(text, [], [], "stop")])
        return outputs


@pytest.fixture(scope="module")
def envs() -> dict:
    cfg = ProceduralConfig(num_train=12, num_test=8, id_pool_size=16)
    return build_procedural_envs(cfg, seed=3)


# The production executor: stateless jobs go to the sandbox as they are.
_execute = StatefulExecutor(timeout=10.0)


PARSE = get_parser("qwen", "ftrl")
PARAMS = SamplingParams(temperature=0.0, max_new_tokens=8)


def _without_ids(text: str) -> list[str]:
    return [re.sub(r"call_[0-9a-f]{16,}", "call_ID", line) for line in text.splitlines()]


def test_snapshots_follow_the_reference_format(envs, tmp_path: Path) -> None:
    train = envs["train"]
    out = tmp_path / "snapshots.jsonl"
    stats = collect_snapshots(ScriptedEngine(train), train, out, params=PARAMS, max_turns=20, parser=PARSE,
                              execute=_execute, batch_size=5)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    turns = {r["messages"][0]["content"]: len(json.loads(r["gold_calls"])) for r in train}
    # one original record + one snapshot per tool-calling turn, for every environment
    assert len(rows) == sum(1 + n for n in turns.values()) == stats["snapshots_written"]
    assert stats["mean_solve_rate"] == 1.0
    for row in rows:  # exactly the reference fields: the gold trajectory never reaches the trainer's data
        assert set(row) == set(REFERENCE_FIELDS)
    snapshots = [r for r in rows if len(r["messages"]) > 1]
    last = {}
    for row in snapshots:
        last[row["messages"][0]["content"]] = row
        assert row["messages"][-1]["role"] == "tool"
        assert 0.0 < row["solve_rate"] <= 1.0
    # after the whole gold chain nothing is left unsolved
    assert all(json.loads(r["unsolved_set"]) == {k: [] for k in json.loads(r["unsolved_set"])} for r in last.values())
    assert all(r["solve_rate"] == 1.0 for r in last.values())


def test_killed_collection_resumes_without_duplicates_or_losses(envs, tmp_path: Path) -> None:
    train = envs["train"]
    reference = tmp_path / "reference.jsonl"
    collect_snapshots(ScriptedEngine(train), train, reference, params=PARAMS, max_turns=20, parser=PARSE,
                      execute=_execute, batch_size=4)
    out = tmp_path / "snapshots.jsonl"
    original_append = EpisodeLog.append
    appended = {"n": 0}

    def crash_after_five(self, index, record, rows):
        if appended["n"] == 5:
            # the crash lands in the middle of writing the sixth episode: half its rows reach the file
            rows = list(rows)
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(rows[0]) + "\n" + json.dumps(rows[1])[:40])
            raise KeyboardInterrupt
        appended["n"] += 1
        original_append(self, index, record, rows)

    EpisodeLog.append = crash_after_five
    try:
        with pytest.raises(KeyboardInterrupt):
            collect_snapshots(ScriptedEngine(train), train, out, params=PARAMS, max_turns=20, parser=PARSE,
                              execute=_execute, batch_size=4)
    finally:
        EpisodeLog.append = original_append
    engine = ScriptedEngine(train)
    stats = collect_snapshots(engine, train, out, params=PARAMS, max_turns=20, parser=PARSE, execute=_execute,
                              batch_size=4)
    assert stats["episodes_resumed"] == 5 and stats["episodes_run"] == len(train) - 5
    # same records, none twice, none lost (tool-call ids are timestamps under compat=ftrl: masked)
    resumed = sorted(_without_ids(out.read_text()))
    assert len(resumed) == len(reference.read_text().splitlines())
    assert resumed == sorted(_without_ids(reference.read_text()))
    # a third run has nothing left to do and asks the engine nothing
    engine = ScriptedEngine(train)
    stats = collect_snapshots(engine, train, out, params=PARAMS, max_turns=20, parser=PARSE, execute=_execute)
    assert stats["episodes_run"] == 0 and engine.calls == 0


def test_own_test_metrics_follow_the_reference_definitions(envs, tmp_path: Path) -> None:
    test = envs["test"]
    perfect = evaluate_own_test(ScriptedEngine(test), test, tmp_path / "a.jsonl", params=PARAMS, max_turns=20,
                                parser=PARSE, execute=_execute)
    assert perfect["ftrl_test/solve_p"] == perfect["ftrl_test/solve_r"] == perfect["ftrl_test/solve_f1"] == 1.0
    # one wasted call first: precision and F1 drop, recall stays
    sloppy = evaluate_own_test(ScriptedEngine(test, wrong_first=True), test, tmp_path / "b.jsonl", params=PARAMS,
                               max_turns=20, parser=PARSE, execute=_execute)
    rows = [json.loads(line) for line in (tmp_path / "b.jsonl").read_text().splitlines()]
    for row in rows:
        calls, total = row["calls"], row["total"]
        assert calls == total + 1 and row["solved"] == total
        assert row["metrics"]["solve_precision"] == pytest.approx(total / (total + 1))
        assert row["metrics"]["solve_f1"] == pytest.approx(2 * total / (calls + total))
    assert sloppy["ftrl_test/solve_r"] == 1.0 and sloppy["ftrl_test/solve_p"] < 1.0


def test_scenario_average_then_across_scenarios() -> None:
    rows = [
        {"data_source": "A", "metrics": {"solve_precision": 1.0, "solve_rate": 1.0, "solve_f1": 1.0}},
        {"data_source": "A", "metrics": {"solve_precision": 0.0, "solve_rate": 0.0, "solve_f1": 0.0}},
        {"data_source": "A", "metrics": {"solve_precision": 1.0, "solve_rate": 0.5, "solve_f1": 0.5}},
        {"data_source": "B", "metrics": {"solve_precision": 1.0, "solve_rate": 0.0, "solve_f1": 0.0}},
    ]
    metrics = aggregate_by_scenario(rows)
    assert metrics["ftrl_test/A/solve_f1"] == pytest.approx(0.5)
    assert metrics["ftrl_test/solve_f1"] == pytest.approx(0.25)  # (0.5 + 0.0) / 2, not 1.5 / 4
    assert metrics["ftrl_test/solve_p"] == pytest.approx((2 / 3 + 1.0) / 2)


def test_episode_without_calls_counts_precision_one(envs) -> None:
    class Silent(ChatEngine):
        def render(self, request):
            return ""

        def generate(self, requests, params):
            return [[Generation("I do not know.", [], [], "stop")] for _ in requests]

    done = []
    run_episodes(Silent(), list(enumerate(envs["test"][:2])), params=PARAMS, max_turns=5, parser=PARSE,
                 execute=_execute, on_done=done.append, progress=False)
    assert [e.metrics() for e in done] == [{"solve_precision": 1.0, "solve_rate": 0.0, "solve_f1": 0.0}] * 2
    assert all(e.turns == 1 for e in done)


def test_max_turns_ends_an_episode(envs) -> None:
    class Looper(ChatEngine):
        def render(self, request):
            return ""

        def generate(self, requests, params):
            bad = format_tool_calls([{"name": "nothing_here", "arguments": {}}])
            return [[Generation(bad, [], [], "stop")] for _ in requests]

    done = []
    run_episodes(Looper(), list(enumerate(envs["test"][:3])), params=PARAMS, max_turns=4, parser=PARSE,
                 execute=_execute, on_done=done.append, progress=False)
    assert [e.turns for e in done] == [4, 4, 4] and all(e.calls == 4 for e in done)
    assert "an error occured when call nothing_here" in done[0].messages[2]["content"]


def test_snapshots_of_a_stateful_environment_keep_its_state(envs, tmp_path: Path) -> None:
    """Every snapshot of a tau-bench-like record carries ``state``: the reward replays its history on it."""
    from ftrl.collect import Episode

    record = dict(envs["train"][0], state='{"family": "taubench", "domain": "retail", "db_sha256": "x"}')
    episode = Episode.start(0, record)
    episode.messages.append({"role": "assistant", "content": "", "tool_calls": []})
    for snapshot in (Episode.start(0, record).snapshot_record(), episode.snapshot_record()):
        assert snapshot["state"] == record["state"] and "gold_calls" not in snapshot
    plain = Episode.start(0, envs["train"][0]).snapshot_record()
    assert set(plain) == set(REFERENCE_FIELDS)
