"""RoTBench: the pure TS/PI/CF scorers in both compat modes (every difference pinned with both values),
scripted answers over the shared data, resume, and an end-to-end run through the OpenAI-compatible engine.

    OMP_NUM_THREADS=1 python -m pytest tests/test_eval_rotbench.py -q
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from openai_stub import Reply, StubServer, completion

from ftrl.errors import MissingInputError
from ftrl.eval.rotbench import (
    LEVELS,
    evaluate_samples,
    load_folder,
    load_jsonl,
    score_official,
    score_sample,
    to_messages,
    tool_names,
)
from ftrl.llm.engines.base import Generation, SamplingParams

DATA = Path(os.environ.get("FTRL_DATA_DIR", "")) / "rotbench"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="shared RoTBench data not present")

TOOLS = [
    {"name": "get_weather", "parameters": {"properties": {"city": {}, "unit": {}}}},
    {"name": "get_time", "parameters": {"properties": {}}},
    {"name": "ask_to_user", "parameters": {"properties": {"question": {}}}},
    {"name": "finish", "parameters": {"properties": {"answer": {}}}},
]


def _system(tools: list[dict]) -> str:
    return "You use tools. Tools:\n" + json.dumps(tools) + "\n\nLet's Begin!"


def _answer(tool: str, params: object, thought: str = "") -> str:
    text = params if isinstance(params, str) else json.dumps(params)
    return f"Thought:{thought}\nAction: {tool}\nAction Input: {text}"


def _sample(golds: list[str], tools: list[dict] = TOOLS) -> dict:
    return {"level": "clean", "answer": golds,
            "messages": [{"role": "system", "content": _system(tools)}, {"role": "user", "content": "q"}]}


def _both(sample: dict, response: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    return tuple(tuple(score_sample(sample, response, compat)[m] for m in ("ts", "pi", "cf"))
                 for compat in ("ftrl", "official"))


WEATHER = _sample([_answer("get_weather", {"city": "Paris", "unit": "C"})])


# ------------------------------------------------------------------------------------ hand-written cases
def test_exact_gold_scores_one_and_wrong_tool_zero_in_both_modes() -> None:
    assert _both(WEATHER, _answer("get_weather", {"city": "Paris", "unit": "C"})) == ((1, 1, 1), (1, 1, 1))
    assert _both(WEATHER, _answer("get_time", {"city": "Paris", "unit": "C"})) == ((0, 0, 0), (0, 0, 0))
    # right tool, a key missing: TS only; right keys, a wrong value: TS and PI
    assert _both(WEATHER, _answer("get_weather", {"city": "Paris"})) == ((1, 0, 0), (1, 0, 0))
    assert _both(WEATHER, _answer("get_weather", {"city": "Rome", "unit": "C"})) == ((1, 1, 0), (1, 1, 0))


def test_unreadable_answers_score_zero_in_both_modes() -> None:
    for response in ("no action here", "Action: get_weather\nAction Input: {city: Paris}",
                     _answer("get_weather", {"city": "Paris", "unit": "C"}) + "\nObservation: sunny",
                     _answer("get_weather", '"Paris"')):
        assert _both(WEATHER, response) == ((0, 0, 0), (0, 0, 0)), response
    row = score_sample(WEATHER, "no action here")
    assert row["parsed"] == 0.0


def test_empty_dict_counts_for_ftrl_but_is_wrong_for_official() -> None:
    time_sample = _sample([_answer("get_time", {})])
    assert _both(time_sample, _answer("get_time", {})) == ((1, 1, 1), (0, 0, 0))
    # against a gold with keys: ftrl still gives TS, official nothing
    assert _both(WEATHER, _answer("get_weather", {})) == ((1, 0, 0), (0, 0, 0))


def test_finish_matches_the_renamed_last_tool_only_officially() -> None:
    renamed = [*TOOLS[:2], {"name": "resu_ot_ksa", "parameters": {}}, {"name": "hsinif", "parameters": {}}]
    sample = _sample([_answer("hsinif", {"answer": "It is 12:00."})], renamed)
    # the model says "finish" (the name in the instructions) with other wording: official TS/PI/CF all 1
    # (CF is automatic for the finish tool), ftrl nothing
    assert _both(sample, _answer("finish", {"answer": "Noon."})) == ((0, 0, 0), (1, 1, 1))
    # naming the renamed tool itself: both give TS and PI; only official gives CF for other wording
    assert _both(sample, _answer("hsinif", {"answer": "Noon."})) == ((1, 1, 0), (1, 1, 1))


def test_cf_is_automatic_for_finish_and_ask_to_user_officially() -> None:
    finish = _sample([_answer("finish", {"answer": "It is sunny in Paris."})])
    assert _both(finish, _answer("finish", {"answer": "Sunny."})) == ((1, 1, 0), (1, 1, 1))
    ask = _sample([_answer("ask_to_user", {"question": "Which city?"})])
    assert _both(ask, _answer("ask_to_user", {"question": "What city do you mean?"})) == ((1, 1, 0), (1, 1, 1))
    # still needs the same keys
    assert _both(ask, _answer("ask_to_user", {"q": "Which city?"})) == ((1, 0, 0), (1, 0, 0))


def test_none_valued_gold_keys_are_dropped_officially() -> None:
    sample = _sample([_answer("get_weather", {"city": "Paris", "unit": "None"})])
    assert _both(sample, _answer("get_weather", {"city": "Paris", "unit": "C"})) == ((1, 1, 0), (1, 1, 1))
    assert _both(sample, _answer("get_weather", {"city": "Paris", "unit": "None"})) == ((1, 1, 1), (1, 1, 1))
    # the key itself must still be there (PI is checked before the drop)
    assert _both(sample, _answer("get_weather", {"city": "Paris"})) == ((1, 0, 0), (1, 0, 0))


def test_the_none_key_drop_sticks_for_later_golds_officially() -> None:
    # evaluate.py deletes the "None" keys from the answer once and keeps it that way for the next gold
    sample = _sample([_answer("get_weather", {"city": "Paris", "unit": "None"}),
                      _answer("get_weather", {"city": "Rome", "unit": "F"})])
    assert _both(sample, _answer("get_weather", {"city": "Rome", "unit": "F"})) == ((1, 1, 1), (1, 1, 0))


def test_values_are_compared_as_a_bag_by_ftrl_and_by_key_officially() -> None:
    sample = _sample([_answer("get_weather", {"city": "Paris", "unit": "Rome"})])
    swapped = _answer("get_weather", {"city": "Rome", "unit": "Paris"})
    assert _both(sample, swapped) == ((1, 1, 1), (1, 1, 0))


def test_types_matter_in_both_modes() -> None:
    sample = _sample([_answer("get_weather", {"city": "Paris", "unit": 1})])
    assert _both(sample, _answer("get_weather", {"city": "Paris", "unit": "1"})) == ((1, 1, 0), (1, 1, 0))


def test_first_action_inside_the_thinking_text() -> None:
    # ftrl scores the raw generation: the first "Action: " is inside the thought, so the tool name read is
    # garbage; official removes the thinking text first and reads the answer's action
    response = ("<think>Maybe Action: get_time, but the user wants weather.</think>\n"
                + _answer("get_weather", {"city": "Paris", "unit": "C"}))
    assert _both(WEATHER, response) == ((0, 0, 0), (1, 1, 1))
    # without thinking tags, a mention in the ReAct thought misleads both readers
    mention = _answer("get_weather", {"city": "Paris", "unit": "C"}, thought=" pick Action: get_weather now.")
    assert _both(WEATHER, mention) == ((0, 0, 0), (0, 0, 0))


def test_marker_spacing_differs_between_the_readers() -> None:
    # official reads the tool at a fixed offset (8 characters after "Action:") and drops one newline:
    # a trailing space is kept (wrong tool); ftrl strips it
    spaced = "Thought:\nAction: get_weather \nAction Input: " + json.dumps({"city": "Paris", "unit": "C"})
    assert _both(WEATHER, spaced) == ((1, 1, 1), (0, 0, 0))
    # "Action:" followed by a newline: ftrl finds no "Action: ", official skips the newline as the space
    newline = "Thought:\nAction:\nget_weather\nAction Input: " + json.dumps({"city": "Paris", "unit": "C"})
    assert _both(WEATHER, newline) == ((0, 0, 0), (1, 1, 1))


def test_unhashable_values_keep_ftrl_ts_and_pi() -> None:
    # the reference's Counter raises on a list value inside its try block: TS/PI found so far stay
    sample = _sample([_answer("get_weather", {"city": "Paris", "unit": "C"})])
    assert _both(sample, _answer("get_weather", {"city": ["Paris"], "unit": "C"})) == ((1, 1, 0), (1, 1, 0))


def test_non_dict_parameters() -> None:
    # a JSON list: ftrl requires a dict (all 0); evaluate.py only checks truthiness before TS (TS 1)
    assert _both(WEATHER, _answer("get_weather", ["Paris", "C"])) == ((0, 0, 0), (1, 0, 0))


def test_any_gold_of_several_counts() -> None:
    sample = _sample([_answer("get_weather", {"city": "Paris", "unit": "C"}), _answer("get_time", {"zone": "CET"})])
    assert _both(sample, _answer("get_time", {"zone": "CET"})) == ((1, 1, 1), (1, 1, 1))


def test_tool_names_and_message_conversion() -> None:
    assert tool_names(_system(TOOLS)) == ["get_weather", "get_time", "ask_to_user", "finish"]
    assert tool_names("no list") == []
    turns = [{"from": "system", "value": "s"}, {"from": "user", "value": "u"}, {"from": "assistant", "value": "a"},
             {"from": "function", "value": "42"}]
    assert to_messages(turns) == [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                                  {"role": "assistant", "content": "a"},
                                  {"role": "user", "content": "Observation: 42"}]
    assert score_official(_answer("finish", {"answer": "x"}), [_answer("finish", {"answer": "y"})], []) == {
        "ts": 1.0, "pi": 1.0, "cf": 1.0, "parsed": 1.0}


# ------------------------------------------------------------------------------------ the shared data
def _gold_rate(samples: list[dict], compat: str, pick) -> dict[str, dict[str, float]]:
    totals: dict[str, dict[str, float]] = {}
    for sample in samples:
        scores = score_sample(sample, pick(sample), compat)
        level = totals.setdefault(sample["level"], {"ts": 0.0, "pi": 0.0, "cf": 0.0, "n": 0.0})
        for name in ("ts", "pi", "cf"):
            level[name] += scores[name]
        level["n"] += 1
    return totals


@needs_data
@pytest.mark.parametrize("turn", ["first", "third"])
def test_answering_with_the_gold_over_the_shared_data(turn: str) -> None:
    samples = load_folder(DATA, turn, LEVELS)
    assert len(samples) == {"first": 840, "third": 560}[turn]
    counts = {level: sum(s["level"] == level for s in samples) for level in LEVELS}
    assert counts == ({"clean": 105, "slight": 210, "medium": 210, "heavy": 210, "union": 105} if turn == "first"
                      else {"clean": 70, "slight": 140, "medium": 140, "heavy": 140, "union": 70})
    # every gold is readable by both readers; a gold answer is TS=PI=CF=1 under ftrl
    ftrl = _gold_rate(samples, "ftrl", lambda s: s["answer"][0])
    assert all(t["ts"] == t["pi"] == t["cf"] == t["n"] for t in ftrl.values())
    # official: an item whose golds all have empty parameters ({}) can never be right there
    official = _gold_rate(samples, "official", lambda s: s["answer"][0])
    all_empty = {"first": {"clean": 8, "slight": 16, "medium": 16, "heavy": 10, "union": 8},
                 "third": {"clean": 3, "slight": 6, "medium": 6, "heavy": 3, "union": 1}}[turn]
    for level, t in official.items():
        assert t["ts"] == t["pi"] == t["cf"] == t["n"] - all_empty[level], level
    # a tool that no item has: 0 everywhere in both modes
    for compat in ("ftrl", "official"):
        wrong = _gold_rate(samples, compat, lambda s: _answer("no_such_tool", {"x": "y"}))
        assert all(t["ts"] == t["pi"] == t["cf"] == 0 for t in wrong.values())


@needs_data
def test_saying_finish_for_renamed_finish_golds_in_the_third_turn_data() -> None:
    samples = load_folder(DATA, "third", ["slight"])
    finish_items = []
    for sample in samples:
        names = tool_names(sample["messages"][0]["content"])
        gold = sample["answer"][0]
        if gold.split("Action: ")[1].split("\n")[0] == names[-1]:
            params = gold.split("Action Input: ")[1]
            finish_items.append((sample, _answer("finish", json.loads(params)), names[-1] == "finish"))
    assert len(finish_items) == 72
    unrenamed = sum(plain for _, _, plain in finish_items)
    ftrl = [score_sample(s, r, "ftrl")["ts"] for s, r, _ in finish_items]
    official = [score_sample(s, r, "official")["cf"] for s, r, _ in finish_items]
    assert sum(ftrl) == unrenamed < 72 and sum(official) == 72


# ------------------------------------------------------------------------------------ protocol, resume
def _key(messages: list[dict]) -> str:
    """A conversation's identity (the same query recurs across levels with other tool lists)."""
    return json.dumps([(m["role"], m["content"]) for m in messages])


class ScriptedEngine:
    """Answers each conversation from a script keyed by its user turn; counts the calls."""

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers = answers
        self.calls = 0

    def generate(self, requests, params):
        self.calls += len(requests)
        assert all(r.tools is None for r in requests)
        return [[Generation(self.answers.get(_key(r.messages), "I do not know."), [], [], "stop")]
                for r in requests]


def _few(n_per_level: int = 2) -> list[dict]:
    from ftrl.eval.runner import cap_per_group

    return cap_per_group(load_folder(DATA, "first", LEVELS), lambda s: s["level"], n_per_level)


@needs_data
def test_evaluate_samples_aggregates_and_resumes(tmp_path: Path) -> None:
    samples = _few()
    # gold answers for clean and union, nothing readable elsewhere
    script = {_key(s["messages"]): s["answer"][0] for s in samples if s["level"] in ("clean", "union")}
    out = tmp_path / "rotbench.jsonl"
    engine = ScriptedEngine(script)
    first = evaluate_samples(engine, samples[:5], out, params=SamplingParams(), batch_size=3)
    assert engine.calls == 5
    engine = ScriptedEngine(script)
    metrics = evaluate_samples(engine, samples, out, params=SamplingParams(), batch_size=4)
    assert engine.calls == len(samples) - 5 == 5  # the first five are not generated again
    assert first["rotbench/n"] == 5.0
    for level in LEVELS:
        good = 1.0 if level in ("clean", "union") else 0.0
        assert metrics[f"rotbench/{level}/ts"] == metrics[f"rotbench/{level}/cf"] == good
        assert metrics[f"rotbench/{level}/n"] == 2.0
        assert metrics[f"rotbench/{level}/failed"] == 2.0 - 2 * good
    assert metrics["rotbench/ts"] == metrics["rotbench/pi"] == metrics["rotbench/cf"] == pytest.approx(0.4)
    assert metrics["rotbench/n"] == 10.0 and metrics["rotbench/failed"] == 6.0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["index"] for r in rows) == list(range(10))


def test_jsonl_layout_levels_turns_and_errors(tmp_path: Path) -> None:
    gold = _answer("get_weather", {"city": "Paris", "unit": "C"})
    lines = [{"messages": WEATHER["messages"], "answer": [gold], "data_source": source}
             for source in ("RoTBench/First_Turn/clean", "RoTBench/First_Turn/heavy", "RoTBench/Third_Turn/clean",
                            "RoTBench_slight")]
    path = tmp_path / "RoTBench.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    first = load_jsonl(path, "first", LEVELS)
    assert [(s["level"], s["data_source"]) for s in first] == [
        ("clean", "RoTBench/First_Turn/clean"), ("heavy", "RoTBench/First_Turn/heavy"), ("slight", "RoTBench_slight")]
    assert [s["level"] for s in load_jsonl(path, "third", ["clean"])] == ["clean"]
    path.write_text(json.dumps({**lines[0], "data_source": "RoTBench"}) + "\n")
    with pytest.raises(ValueError, match="names no RoTBench noise level"):
        load_jsonl(path, "first", LEVELS)


def test_missing_data_names_benchmark_path_and_key(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from ftrl.config import EvalConfig
    from ftrl.eval.rotbench import load_samples

    cfg = SimpleNamespace(eval=EvalConfig(data_dir=str(tmp_path)))
    with pytest.raises(MissingInputError, match=r"rotbench: no folder .*rotbench.*eval.data_dir"):
        load_samples(cfg)
    (tmp_path / "rotbench" / "First_Turn").mkdir(parents=True)
    with pytest.raises(MissingInputError, match=r"First_Turn/clean.json.*eval.rotbench"):
        load_samples(cfg)
    cfg.eval.rotbench.file = str(tmp_path / "nope.jsonl")
    with pytest.raises(MissingInputError, match=r"rotbench: no such file .*nope.jsonl.*eval.rotbench.file"):
        load_samples(cfg)


# ------------------------------------------------------------------------------------ end to end (API)
@needs_data
@pytest.mark.parametrize("compat", ["ftrl", "official"])
def test_end_to_end_through_the_openai_compatible_engine(tmp_path: Path, compat: str) -> None:
    from hydra import compose, initialize_config_dir

    import ftrl.run  # registers the ftrl_dirname resolver
    from ftrl.artifacts import RunDir, read_json
    from ftrl.config import load_run_config
    from ftrl.pipeline import run_pipeline

    samples = _few(2)
    golds = {_key(s["messages"]): s for s in samples}

    def respond(body: dict) -> Reply:
        assert "tools" not in body or not body["tools"]
        sample = golds[_key(body["messages"])]
        if sample["level"] == "heavy":  # the wrong tool
            return Reply(200, completion(_answer("no_such_tool", {"x": "y"})))
        if sample["level"] == "medium":  # the right tool with empty parameters
            gold = sample["answer"][0]
            return Reply(200, completion(gold.split("Action Input: ")[0] + "Action Input: {}"))
        return Reply(200, completion(sample["answer"][0]))

    overrides = [f"run_dir={tmp_path / 'run'}", "model=api", "model.path=stub-model", "model.api.api_key_env=",
                 "stages=[eval]", "eval.benchmarks=[rotbench]", f"eval.data_dir={DATA.parent}",
                 "eval.max_samples=2", f"eval.compat={compat}", "logger=console"]
    with StubServer(respond) as server:
        overrides.append(f"model.api.base_url={server.base_url}")
        with initialize_config_dir(config_dir=str(Path(ftrl.run.CONF_DIR)), version_base="1.3"):
            cfg = load_run_config(compose(config_name="config", overrides=overrides))
        run_pipeline(cfg)
        assert len(server.requests) == 10
    metrics = read_json(RunDir(str(tmp_path / "run")).eval_metrics("base"))
    assert metrics["rotbench/n"] == 10.0
    assert metrics["rotbench/heavy/ts"] == 0.0
    for level in ("clean", "slight", "union"):
        assert (metrics[f"rotbench/{level}/ts"], metrics[f"rotbench/{level}/cf"]) == (1.0, 1.0)
    # medium answered with {}: the first two medium items have non-empty golds, so ftrl gives TS only,
    # official nothing
    medium = [s for s in samples if s["level"] == "medium"]
    assert all(json.loads(s["answer"][0].split("Action Input: ")[1]) for s in medium)
    expected_ts = 1.0 if compat == "ftrl" else 0.0
    assert (metrics["rotbench/medium/ts"], metrics["rotbench/medium/pi"]) == (expected_ts, 0.0)
    assert metrics["rotbench/ts"] == pytest.approx((3 + expected_ts) / 5)
    assert metrics["rotbench/cf"] == pytest.approx(3 / 5)
