"""The offline environment generator: determinism, splits, scenarios, the gate and the knobs.

    python -m pytest tests/test_procedural.py -q
"""

from __future__ import annotations

import json
import random
import textwrap
from collections import Counter
from pathlib import Path

import pytest

from ftrl.config import ConfigError, ProceduralConfig
from ftrl.envs import procedural
from ftrl.envs.io import read_records, validate_record
from ftrl.envs.procedural import (
    ANSWER_UNREACHABLE,
    DISTRACTOR_ANSWERS,
    GOLD_CALL_ERROR,
    GOLD_UNSOLVED,
    INVALID_CALL_ACCEPTED,
    INVALID_CALL_LEAKS,
    build_procedural_envs,
    gate,
    generate_envs,
    sample_candidate,
)
from ftrl.envs.sandbox import call_tools, get_sandbox
from ftrl.types import SCENARIOS

SMALL = {"num_train": 24, "num_test": 8}
# Every complexity-scaling strategy off (the default has them all on): for tests about one strategy.
UNSCALED = {"functional_generalization": 0.0, "parameter_expansion": 0.0, "parameter_type_generalization": 0.0,
            "min_distractors": 0, "max_distractors": 0}


def openai_call(call: dict) -> dict:
    return {"id": "c", "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])}}


def run(record: dict, calls: list[dict]) -> list[str]:
    return call_tools(record["codes"], [openai_call(c) for c in calls])


@pytest.fixture(scope="module")
def default_build() -> procedural.ProceduralBuild:
    return generate_envs(ProceduralConfig(**SMALL), seed=0)


def all_records(build: procedural.ProceduralBuild) -> list[dict]:
    return build.records["train"] + build.records["test"]


# ------------------------------------------------------------------------------ sets of records
def test_same_seed_gives_identical_bytes_and_another_seed_differs(default_build) -> None:
    again = build_procedural_envs(ProceduralConfig(**SMALL), seed=0)
    assert json.dumps(again) == json.dumps(default_build.records)
    other = build_procedural_envs(ProceduralConfig(**SMALL), seed=1)
    questions = {r["messages"][0]["content"] for r in all_records(default_build)}
    other_questions = {r["messages"][0]["content"] for split in other.values() for r in split}
    assert len(questions & other_questions) <= 2  # different worlds; a short question may recur


def test_counts_scenarios_and_split_disjointness(default_build) -> None:
    train, test = default_build.records["train"], default_build.records["test"]
    assert (len(train), len(test)) == (24, 8)
    assert Counter(r["data_source"] for r in train) == {s: 6 for s in SCENARIOS}
    assert Counter(r["data_source"] for r in test) == {s: 2 for s in SCENARIOS}
    assert {r["split"] for r in train} == {"train"} and {r["split"] for r in test} == {"test"}
    assert default_build.report.kept == {"train": {s: 6 for s in SCENARIOS}, "test": {s: 2 for s in SCENARIOS}}

    def asked(record: dict) -> tuple:
        # What a question asks, however it is worded: each chain's root id (the first call's
        # argument) and the tools the chain walks. Chains are the columns of the gold turns.
        turns = json.loads(record["gold_calls"])
        chains = [[turn[i] for turn in turns if i < len(turn)] for i in range(len(turns[0]))]
        return tuple(sorted(
            (str(next(iter(chain[0]["arguments"].values()))),) + tuple(c["name"] for c in chain) for chain in chains))

    train_questions = {r["messages"][0]["content"] for r in train}
    assert len(train_questions) == len(train)
    assert not train_questions & {r["messages"][0]["content"] for r in test}
    assert not {asked(r) for r in train} & {asked(r) for r in test}


def test_every_record_is_a_valid_reference_record(default_build) -> None:
    for index, record in enumerate(all_records(default_build)):
        validate_record(record, f"procedural:{index}")
        assert list(record)[:8] == ["messages", "tools", "codes", "unsolved_set", "solve_rate", "answer",
                                    "data_source", "split"]
        assert record["messages"] == [{"role": "user", "content": record["messages"][0]["content"]}]
        assert record["solve_rate"] == 0.0
        unsolved = json.loads(record["unsolved_set"])
        turns = json.loads(record["gold_calls"])
        # One expected answer per gold call, listed under the tool that is called.
        assert Counter(c["name"] for turn in turns for c in turn) == {k: len(v) for k, v in unsolved.items()}
        n_parts = len(record["answer"].split(", "))
        scenario = record["data_source"]
        assert n_parts == (1 if scenario in ("Single-Hop", "Multi-Hop") else len(turns[0]))
        assert len(turns) == 1 if "Single" in scenario else len(turns) >= 2


def test_gold_calls_solve_everything_and_multi_hop_really_chains(default_build) -> None:
    checked = 0
    for record in all_records(default_build):
        turns = json.loads(record["gold_calls"])
        question = record["messages"][0]["content"]
        for call in turns[0]:
            id_value = next(iter(call["arguments"].values()))
            assert str(id_value) in question  # ids are copied from the question ...
        if record["data_source"] != "Multi-Hop":
            continue
        outputs = [run(record, turn) for turn in turns]
        for hop in range(1, len(turns)):
            argument = next(iter(turns[hop][0]["arguments"].values()))
            assert f'"{argument}"' in outputs[hop - 1][0]  # ... or from the previous hop's output
            assert str(argument) not in question
        assert record["answer"] in outputs[-1][0]
        checked += 1
    assert checked == 8


def test_tools_behave_the_same_in_both_sandbox_scopes(default_build) -> None:
    # The tools keep everything inside their function, so the reference's exec scope ("ftrl") and a
    # plain module scope (reward.compat=fixed) give the same outputs.
    jobs = [(r["codes"], [openai_call(c) for turn in json.loads(r["gold_calls"]) for c in turn])
            for r in all_records(default_build)]
    reference = get_sandbox().map_calls(jobs, scope="ftrl")
    assert reference == get_sandbox().map_calls(jobs, scope="module")
    assert not any(output.startswith("an error occured") for outputs in reference for output in outputs)


def test_tools_fail_informatively() -> None:
    record = next(r for r in _knob_build() if r["data_source"] == "Single-Hop")
    call = json.loads(record["gold_calls"])[0][0]
    id_key, id_value = next(iter(call["arguments"].items()))
    unknown = 1000 if isinstance(id_value, int) else "X00"
    bad_id, wrong_type, missing = run(record, [
        {"name": call["name"], "arguments": {id_key: unknown}},
        {"name": call["name"], "arguments": {id_key: [id_value]}},
        {"name": call["name"], "arguments": {}},
    ])
    assert bad_id.startswith(f"an error occured when call {call['name']}: unknown {id_key} {unknown!r}; "
                             "this tool knows ")
    assert f"{id_key} must be " in wrong_type and "got list" in wrong_type
    assert f"missing 1 required positional argument: '{id_key}'" in missing


# ------------------------------------------------------------------------------------------ gate
def entity_of(tool_name: str) -> str:
    return tool_name.split("_")[1]


def _candidate(scenario: str, seed: int, **knobs) -> procedural.Candidate:
    return sample_candidate(scenario, ProceduralConfig(**knobs), random.Random(seed))


def _gold_tool_and_answer(candidate: procedural.Candidate) -> tuple[str, str]:
    unsolved = json.loads(candidate.record["unsolved_set"])
    name = next(iter(unsolved))
    return name, unsolved[name][0]


def _with_code(candidate: procedural.Candidate, name: str, source: str) -> procedural.Candidate:
    codes = json.loads(candidate.record["codes"])
    codes[name] = source
    return procedural.Candidate({**candidate.record, "codes": json.dumps(codes)}, candidate.id_combination,
                                candidate.invalid_calls, candidate.distractor_calls)


def _wrapped(name: str, source: str, body: str) -> str:
    """A tool ``name`` whose ``body`` can call the original as ``real`` (nested: the reference's exec
    scope hides top-level helpers from the tool function)."""
    inner = source.replace(f"def {name}(", "def real(", 1)
    return f"def {name}(*args, **kwargs):\n{textwrap.indent(inner, '    ')}\n{textwrap.indent(body, '    ')}\n"


def test_gate_accepts_good_envs_and_rejects_broken_ones() -> None:
    good = _candidate("Multi-Hop", 3)
    name, answer = _gold_tool_and_answer(good)
    original = json.loads(good.record["codes"])[name]

    raises = _with_code(good, name, f"def {name}(**kwargs):\n    raise RuntimeError('database down')\n")
    wrong_value = _with_code(good, name, original.replace(f"'{answer}'", "'ZZ99'"))
    assert wrong_value.record["codes"] != good.record["codes"]
    accepts_anything = _with_code(good, name, f"def {name}(*args, **kwargs):\n    return {{'value': '{answer}'}}\n")
    leaky = _with_code(good, name, _wrapped(name, original, "try:\n    return real(*args, **kwargs)\n"
                                                  "except Exception as error:\n"
                                                  f"    raise ValueError(f'{{error}}; did you mean {answer}?')"))
    unreachable = procedural.Candidate({**good.record, "answer": "R00"}, good.id_combination,
                                       good.invalid_calls, good.distractor_calls)

    with_distractors = _candidate("Single-Hop", 4, min_distractors=2, max_distractors=2)
    distractor = with_distractors.distractor_calls[0]["name"]
    _, single_answer = _gold_tool_and_answer(with_distractors)
    distractor_code = json.loads(with_distractors.record["codes"])[distractor]
    answering = _with_code(with_distractors, distractor, _wrapped(
        distractor, distractor_code, f"return {{'result': real(*args, **kwargs), 'hint': '{single_answer}'}}"))

    verdicts = gate([good, raises, wrong_value, accepts_anything, leaky, unreachable, with_distractors, answering])
    assert verdicts == [None, GOLD_CALL_ERROR, GOLD_UNSOLVED, INVALID_CALL_ACCEPTED, INVALID_CALL_LEAKS,
                        ANSWER_UNREACHABLE, None, DISTRACTOR_ANSWERS]


# ----------------------------------------------------------------------------------------- knobs
def _tools(record: dict) -> list[dict]:
    return [tool["function"] for tool in json.loads(record["tools"])]


def _knob_build(num_train: int = 8, **knobs) -> list[dict]:
    """Environments with every strategy off but those of ``knobs``."""
    build = generate_envs(ProceduralConfig(num_train=num_train, num_test=0, **{**UNSCALED, **knobs}), seed=5)
    assert sum(build.report.kept["train"].values()) == num_train  # every env passed the gate
    return build.records["train"]


def _strategies(record: dict) -> dict[str, bool]:
    """Which strategies a record's tools show (what the report should count)."""
    tools = _tools(record)
    distractors = [t for t in tools if t["name"] not in json.loads(record["unsolved_set"])]
    first = next(iter(tools[0]["parameters"]["properties"].values()))
    return {"functional_generalization": tools[0]["name"].endswith("_info"),
            "parameter_expansion": "fmt" in tools[0]["parameters"]["properties"],
            "parameter_type_generalization": isinstance(first["type"], list),
            "distractors": bool(distractors)}


def test_default_envs_are_scaled_and_the_report_counts_each_strategy(default_build) -> None:
    report = default_build.report
    for split in ("train", "test"):
        records = default_build.records[split]
        shown = [_strategies(record) for record in records]
        counts = {strategy: sum(s[strategy] for s in shown) for strategy in procedural.STRATEGIES}
        assert report.scaling[split] == {**counts, "unscaled": 0}
        assert counts["distractors"] == len(records)  # 1..2 distractors by default: no env is unscaled
        for record in records:
            assert 1 <= len(_tools(record)) - len(json.loads(record["unsolved_set"])) <= 2
    train = report.scaling["train"]  # each strategy drawn with p = 0.5 over 24 envs
    assert all(4 <= train[s] <= 20 for s in procedural.STRATEGIES[:3])
    assert "scaling train: functional_generalization=" in report.summary()


def test_unscaled_knobs_give_the_simplest_envs() -> None:
    for record in _knob_build():
        tools = _tools(record)
        assert {t["name"] for t in tools} == set(json.loads(record["unsolved_set"]))  # no distractors
        for tool in tools:
            assert not tool["name"].endswith("_info")
            assert len(tool["parameters"]["properties"]) == 1
            assert next(iter(tool["parameters"]["properties"].values()))["type"] in ("integer", "string")


def test_distractors_add_tools_that_are_never_expected() -> None:
    for record in _knob_build(min_distractors=2, max_distractors=3):
        names = [t["name"] for t in _tools(record)]
        expected = json.loads(record["unsolved_set"])
        assert len(set(names)) == len(names)
        assert 2 <= len(names) - len(expected) <= 3
        gold_names = {c["name"] for turn in json.loads(record["gold_calls"]) for c in turn}
        assert gold_names == set(expected)


def test_functional_generalization_merges_getters_into_info_tools() -> None:
    records = _knob_build(16, functional_generalization=1.0, min_distractors=1, max_distractors=2)
    for record in records:
        expected = json.loads(record["unsolved_set"])
        assert all(name.endswith("_info") for name in expected)
        for tool in _tools(record):
            assert tool["parameters"]["required"][1] == "field"
            assert tool["parameters"]["properties"]["field"]["enum"]
        for turn in json.loads(record["gold_calls"]):
            assert all("field" in call["arguments"] for call in turn)
        # Distractors are info tools too (of entities the task does not touch), never getters.
        answering = {entity_of(name) for name in expected}
        assert all(entity_of(t["name"]) not in answering for t in _tools(record) if t["name"] not in expected)
    # Two questions about one kind of entity now share one tool (function integration, n -> m).
    assert any(len(answers) >= 2 for r in records for answers in json.loads(r["unsolved_set"]).values())


def test_parameter_expansion_adds_parameters_that_are_checked() -> None:
    records = _knob_build(parameter_expansion=1.0)
    for record in records:
        for tool in _tools(record):
            assert {"fmt", "verbose"} <= set(tool["parameters"]["properties"])
            assert "fmt" in tool["parameters"]["required"] and "verbose" not in tool["parameters"]["required"]
    record = records[0]
    call = json.loads(record["gold_calls"])[0][0]
    assert call["arguments"]["fmt"] == "json"
    answer = json.loads(record["unsolved_set"])[call["name"]][0]
    as_text, verbose, bad_fmt = run(record, [
        {"name": call["name"], "arguments": {**call["arguments"], "fmt": "text"}},
        {"name": call["name"], "arguments": {**call["arguments"], "verbose": True}},
        {"name": call["name"], "arguments": {**call["arguments"], "fmt": "xml"}},
    ])
    assert answer in as_text and not as_text.startswith("{")
    assert answer in verbose and '"source": ' in verbose
    assert "fmt must be 'json' or 'text', got 'xml'" in bad_fmt


def test_parameter_type_generalization_accepts_strings_numbers_and_lists() -> None:
    records = _knob_build(parameter_type_generalization=1.0)
    for record in records:
        for tool in _tools(record):
            id_param = next(iter(tool["parameters"]["properties"].values()))
            assert isinstance(id_param["type"], list) and "array" in id_param["type"]
            items = id_param["items"]["type"]  # OpenAI-style schemas need the elements' schema
            assert ({items} if isinstance(items, str) else set(items)) == set(id_param["type"]) - {"array"}
    checked = 0
    for record in records:
        call = json.loads(record["gold_calls"])[0][0]
        id_key, id_value = next(iter(call["arguments"].items()))
        answer = json.loads(record["unsolved_set"])[call["name"]][0]
        other_form = str(id_value) if isinstance(id_value, int) else id_value.lower()
        listed, converted = run(record, [
            {"name": call["name"], "arguments": {**call["arguments"], id_key: [id_value]}},
            {"name": call["name"], "arguments": {**call["arguments"], id_key: other_form}},
        ])
        assert json.loads(listed)[0][id_key] == id_value and answer in listed
        assert answer in converted
        checked += 1
    assert checked == 8


# ------------------------------------------------------------------------------ config and CLI
@pytest.mark.parametrize(("knobs", "message"), [
    ({"scenario_weights": {"multihop": 1.0}}, "envs.procedural.scenario_weights: unknown scenario 'multihop'"),
    ({"scenario_weights": {"multi_hop": 0.0}}, "at least one weight must be > 0"),
    ({"max_hops": 5}, "envs.procedural.max_hops: must be in [2, 4]"),
    ({"max_parallel": 1}, "envs.procedural.max_parallel: must be >= 2"),
    ({"parameter_expansion": 1.5}, "envs.procedural.parameter_expansion: must be a probability"),
    ({"min_distractors": 3, "max_distractors": 1}, "need 0 <= min <= max"),
])
def test_bad_knobs_name_the_config_key(knobs: dict, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        generate_envs(ProceduralConfig(num_train=1, num_test=0, **knobs), seed=0)
    assert message in str(error.value)


def test_scenario_weights_select_scenarios() -> None:
    build = generate_envs(ProceduralConfig(num_train=6, num_test=2, max_hops=4,
                                           scenario_weights={"multi_hop": 1.0, "single_hop": 0.0}), seed=2)
    records = all_records(build)
    assert {r["data_source"] for r in records} == {"Multi-Hop"}
    assert all(2 <= len(json.loads(r["gold_calls"])) <= 4 for r in records)


def test_cli_writes_both_splits_and_prints_counts(tmp_path: Path, capsys) -> None:
    assert procedural.main(["--num-train", "4", "--num-test", "4", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "wrote 4 train environments" in printed and "wrote 4 test environments" in printed
    assert "train Parallel Multi-Hop   1" in printed and '"gold_calls": [' in printed
    assert [len(read_records(tmp_path / f"{s}.jsonl")) for s in ("train", "test")] == [4, 4]


def test_value_pools_bound_every_value_and_keep_values_apart() -> None:
    from ftrl.envs.procedural import NUMBER_POOL_FACTOR, value_pools

    pools = value_pools(16, seed=5)
    assert pools == value_pools(16, seed=5) and pools != value_pools(16, seed=6)
    assert len(pools["product_id"]) == 16 and len(pools["number"]) == 16 * NUMBER_POOL_FACTOR
    texts = [str(v).lower() for values in pools.values() for v in values]
    assert len(texts) == len(set(texts))
    assert not [(a, b) for a in texts for b in texts if a != b and a in b]  # no value inside another

    build = generate_envs(ProceduralConfig(**{**SMALL, "id_pool_size": 16}), seed=5)
    allowed = {str(v) for values in pools.values() for v in values}
    for record in all_records(build):
        for turn in json.loads(record["gold_calls"]):
            for call in turn:  # the id argument (field names and fmt are schema words, not pooled values)
                assert str(next(iter(call["arguments"].values()))) in allowed
        assert set(record["answer"].split(", ")) <= allowed


def test_pool_size_is_validated() -> None:
    with pytest.raises(ConfigError, match="envs.procedural.id_pool_size"):
        generate_envs(ProceduralConfig(**{**SMALL, "id_pool_size": 3}), seed=0)


# -------------------------------------------------------------------- order, style, scaling checks
def test_tool_order_is_shuffled_per_environment() -> None:
    build = generate_envs(ProceduralConfig(num_train=80, num_test=0), seed=7)
    first_is_distractor = last_is_distractor = 0
    for record in build.records["train"]:
        names = [t["name"] for t in _tools(record)]
        expected = json.loads(record["unsolved_set"])
        first_is_distractor += names[0] not in expected
        last_is_distractor += names[-1] not in expected
        assert list(json.loads(record["codes"])) == names  # codes follow the same order
    # Distractors used to be always last: now either end holds one in a fair share of environments.
    assert 15 <= first_is_distractor <= 65 and 15 <= last_is_distractor <= 65


def test_scaling_problem_names_a_strategy_that_is_missing() -> None:
    candidate = _candidate("Single-Hop", 11, functional_generalization=1.0, parameter_expansion=1.0,
                           parameter_type_generalization=1.0, min_distractors=2, max_distractors=2)
    assert procedural.scaling_problem(candidate, min_distractors=2) is None
    tools = json.loads(candidate.record["tools"])

    def with_tools(changed: list[dict], **scaling) -> procedural.Candidate:
        record = {**candidate.record, "tools": json.dumps(changed)}
        return procedural.Candidate(record, candidate.id_combination, candidate.invalid_calls,
                                    candidate.distractor_calls, {**candidate.scaling, **scaling})

    no_field = json.loads(json.dumps(tools))
    del no_field[0]["function"]["parameters"]["properties"]["field"]
    problem = procedural.scaling_problem(with_tools(no_field), 2)
    assert problem == f"{tools[0]['function']['name']}: functional_generalization drawn but missing"
    assert "parameter_expansion present but not drawn" in procedural.scaling_problem(
        with_tools(tools, parameter_expansion=False), 2)
    assert procedural.scaling_problem(with_tools(tools[:-1]), 2).startswith("1 distractor tool(s)")
    no_items = json.loads(json.dumps(tools))
    del next(iter(no_items[1]["function"]["parameters"]["properties"].values()))["items"]
    assert "parameter_type_generalization drawn but missing" in procedural.scaling_problem(with_tools(no_items), 2)


def test_build_report_explains_every_rejection_and_reaches_the_run_manifest(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    from ftrl.artifacts import RunDir, read_json
    from ftrl.config import load_run_config
    from ftrl.run_state import RunContext
    from ftrl.stages import build_envs

    cfg = load_run_config(OmegaConf.create({"run_dir": str(tmp_path / "run"), "envs": {
        "name": "procedural", "procedural": {"num_train": 16, "num_test": 8, "id_pool_size": 8}}}))
    ctx = RunContext(cfg=cfg, run_dir=RunDir(cfg.run_dir))
    build_envs(ctx)
    build = read_json(ctx.run_dir.envs_manifest)["source_manifest"]["build"]
    assert build["scaling"]["train"]["unscaled"] == 0 and build["scaling"]["train"]["distractors"] == 16
    assert build["rejected"] and set(build["reasons"]) == set(build["rejected"])  # a small pool: some redraws
    assert build["reasons"]["value_pool_exhausted"] == procedural.REASONS["value_pool_exhausted"]
    assert "seconds" not in build and "gate_seconds" not in build  # the manifest stays reproducible

    report = procedural.BuildReport(seed=0)
    candidate = _candidate("Single-Hop", 1)
    for _ in range(5):
        report.reject(procedural.HOP_LEAK, candidate, "evidence")
    assert report.rejected == {procedural.HOP_LEAK: 5} and len(report.examples) == procedural.MAX_EXAMPLES
    assert report.reasons[procedural.HOP_LEAK].startswith("a gold output already holds the sub-answer")
    assert report.examples[0] == {"reason": procedural.HOP_LEAK, "question": candidate.question, "detail": "evidence"}
