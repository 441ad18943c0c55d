"""The environment gate of build_envs (ftrl.envs.gate): bad reference files are dropped with a report or refused.

Real files in tmp dirs go through ``envs=ftrl_files`` and ``stages.build_envs``; each bad input is
checked in both ``envs.invalid`` modes: drop (the report names the reason and file:line) and fail
(an error naming file:line and the cause).

    python -m pytest tests/test_env_gate.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ftrl.artifacts import RunDir, read_json
from ftrl.config import FilesConfig, load_run_config
from ftrl.envs import gate as env_gate
from ftrl.envs.gate import EnvGateError, gate_records
from ftrl.envs.io import RecordError, load_ftrl_files, read_records, write_jsonl
from ftrl.errors import ConfigError
from ftrl.run_state import RunContext
from ftrl.stages import build_envs

CODE = "def get_order_total(order_id):\n    return {'order_id': order_id, 'total': 624}\n"
TOOL = {"type": "function", "function": {
    "name": "get_order_total", "description": "Get the total of an order.",
    "parameters": {"type": "object", "properties": {"order_id": {"type": "integer"}}, "required": ["order_id"]}}}
TIMEOUT_S = 0.5


def make_record(split: str = "train", code: str = CODE, **overrides) -> dict:
    record = {
        "messages": [{"role": "user", "content": "What is the total of order 8514?"}],
        "tools": json.dumps([TOOL]),
        "codes": json.dumps({"get_order_total": code}),
        "unsolved_set": json.dumps({"get_order_total": ["624"]}),
        "solve_rate": 0.0,
        "answer": "624",
        "data_source": "Single-Hop",
        "split": split,
        "gold_calls": json.dumps([[{"name": "get_order_total", "arguments": {"order_id": 8514}}]]),
    }
    record.update(overrides)
    return record


# Each bad record, and the reason the gate gives for it.
BAD = {
    "syntax_error": make_record(code="def get_order_total(order_id)\n    return 624\n"),
    "tool_timeout": make_record(code="def get_order_total(order_id):\n    import time\n    time.sleep(30)\n    return 624\n"),
    "gold_leaves_unsolved": make_record(code="def get_order_total(order_id):\n    return {'total': 17}\n"),
    "gold_call_error": make_record(code="def get_order_total(order_id):\n    raise KeyError(order_id)\n"),
    "not_a_json_string": make_record(tools=[TOOL]),
    "tool_not_defined": make_record(code="def get_total(order_id):\n    return 624\n"),
    "invalid_record": {key: value for key, value in make_record().items() if key != "answer"},
}


def _run(tmp: Path, train: Path | None, test: Path | None, stages: list[str] | None = None, **envs) -> RunContext:
    cfg = load_run_config(OmegaConf.create({
        **({"stages": stages} if stages else {}),
        "run_dir": str(tmp / "run"),
        "envs": {"name": "ftrl_files", "files": {"train": str(train) if train else None,
                                                 "test": str(test) if test else None}, **envs},
        "reward": {"tool_timeout_s": TIMEOUT_S},
    }))
    return RunContext(cfg=cfg, run_dir=RunDir(cfg.run_dir))


def _files(tmp: Path, train: list[dict], test: list[dict] | None = None) -> tuple[Path, Path]:
    test = [make_record("test")] if test is None else test
    return write_jsonl(tmp / "train.jsonl", train), write_jsonl(tmp / "test.jsonl", test)


@pytest.mark.parametrize("reason", sorted(BAD))
def test_drop_mode_drops_the_bad_record_and_reports_why(tmp_path: Path, reason: str) -> None:
    train, test = _files(tmp_path, [make_record(), BAD[reason], make_record(answer="624")])
    ctx = _run(tmp_path, train, test)
    info = build_envs(ctx)
    assert (info["train"], info["test"]) == (2, 1)
    assert len(read_records(ctx.run_dir.envs("train"))) == 2
    gate = read_json(ctx.run_dir.envs_manifest)["gate"]
    assert gate["mode"] == "drop" and gate["dropped"] == {reason: 1}
    assert gate["checked"] == {"train": 3, "test": 1} and gate["kept"] == {"train": 2, "test": 1}
    [example] = gate["examples"]
    assert example["where"] == f"{train}:2" and example["reason"] == reason and example["detail"]


@pytest.mark.parametrize("reason", sorted(BAD))
def test_fail_mode_refuses_naming_file_line_and_cause(tmp_path: Path, reason: str) -> None:
    train, test = _files(tmp_path, [make_record(), BAD[reason]])
    ctx = _run(tmp_path, train, test, invalid="fail")
    with pytest.raises(ValueError, match=r"envs.invalid=fail: 1 of 3 environments") as error:
        build_envs(ctx)
    assert f"{train}:2: {reason}: " in str(error.value)
    assert not ctx.run_dir.envs("train").exists()


def test_details_name_the_cause(tmp_path: Path) -> None:
    train, _ = _files(tmp_path, [BAD[r] for r in sorted(BAD)])
    loaded_where: dict[str, list[str]] = {}
    loaded = load_ftrl_files(FilesConfig(train=str(train)), validate=False, locations=loaded_where)
    _, report = gate_records(loaded, timeout=TIMEOUT_S, locations=loaded_where)
    details = {e["reason"]: e["detail"] for e in report.examples}
    assert set(details) == set(BAD)
    assert "codes['get_order_total'] line 1: SyntaxError" in details["syntax_error"]
    assert "timed out after 0.5 seconds" in details["tool_timeout"]
    assert "unsolved: {\"get_order_total\": [\"624\"]}" in details["gold_leaves_unsolved"]
    assert "field 'tools' must be stored as a JSON string" in details["not_a_json_string"]
    assert "missing field 'answer'" in details["invalid_record"]


def test_records_without_gold_calls_get_the_static_checks_only(tmp_path: Path) -> None:
    reference = {k: v for k, v in make_record().items() if k != "gold_calls"}
    broken = {k: v for k, v in BAD["syntax_error"].items() if k != "gold_calls"}
    kept, report = gate_records({"train": [reference, broken]}, timeout=TIMEOUT_S)
    assert kept["train"] == [reference]
    assert report.without_gold_calls == 1 and report.dropped == {"syntax_error": 1}
    assert report.examples[0]["where"] == "train record 2"


@pytest.mark.parametrize("split", ["train", "test"])
def test_an_empty_split_file_is_refused_at_build_envs(tmp_path: Path, split: str) -> None:
    train, test = _files(tmp_path, [] if split == "train" else [make_record()], [] if split == "test" else None)
    ctx = _run(tmp_path, train, test)
    with pytest.raises(RecordError, match=rf"envs.files.{split}: '.*{split}.jsonl' holds no records"):
        build_envs(ctx)


def test_a_needed_split_emptied_by_the_gate_is_refused_naming_the_file(tmp_path: Path) -> None:
    train, test = _files(tmp_path, [make_record()], [BAD["syntax_error"] | {"split": "test"}])
    with pytest.raises(EnvGateError, match=rf"the test split from envs.files.test='{test}' is empty: all 1 records "
                                           r"were dropped by the gate \(syntax_error=1\); eval"):
        build_envs(_run(tmp_path, train, test))
    # Not needed (no eval): the empty split is written and the run goes on.
    ctx = _run(tmp_path, train, test, stages=["build_envs", "collect", "train"])
    assert build_envs(ctx)["test"] == 0
    # Train is needed by collect/train and the warm start.
    train_only_bad, _ = _files(tmp_path, [BAD["tool_timeout"]])
    with pytest.raises(EnvGateError, match=r"the train split from envs.files.train=.* \(tool_timeout=1\); stages"):
        build_envs(_run(tmp_path, train_only_bad, test))


def test_broken_files_still_fail_with_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_bytes(json.dumps(make_record()).encode() + b"\n" + b'{"messages": [')
    with pytest.raises(RecordError, match=rf"{path}:2: line is not valid JSON"):
        build_envs(_run(tmp_path, path, None))
    path.write_bytes(json.dumps(make_record()).encode() + b"\n\xff\xfe\n")
    with pytest.raises(RecordError, match=rf"{path}:2: line is not valid JSON"):
        build_envs(_run(tmp_path, path, None))


def test_tools_as_a_list_is_refused_by_the_loader_with_file_and_line(tmp_path: Path) -> None:
    train, _ = _files(tmp_path, [make_record(), BAD["not_a_json_string"]])
    with pytest.raises(RecordError, match=rf"{train}:2: field 'tools' must be stored as a JSON string"):
        load_ftrl_files(FilesConfig(train=str(train)))


def test_envs_invalid_is_checked() -> None:
    with pytest.raises(ConfigError, match="envs.invalid"):
        load_run_config(OmegaConf.create({"envs": {"invalid": "skip"}}))


def test_generated_environments_pass_the_gate_unchanged() -> None:
    from ftrl.config import ProceduralConfig
    from ftrl.envs.procedural import build_procedural_envs

    knobs = {"functional_generalization": 0.5, "parameter_expansion": 0.5, "parameter_type_generalization": 0.5,
             "min_distractors": 0, "max_distractors": 2}
    records = build_procedural_envs(ProceduralConfig(num_train=24, num_test=8, **knobs), seed=3)
    kept, report = gate_records(records, timeout=10.0)
    assert report.dropped == {} and report.without_gold_calls == 0
    assert all(kept[split] == records[split] for split in records)


def test_a_warm_start_without_gold_calls_is_refused_at_build_envs(tmp_path: Path) -> None:
    """The FTRL release's files carry no gold_calls: the warm start would have nothing to learn from."""
    reference = {k: v for k, v in make_record().items() if k != "gold_calls"}
    train, test = _files(tmp_path, [reference])
    with pytest.raises(ConfigError, match=r"model.warm_start=true learns from gold trajectories, but no train "
                                          rf"environment of envs.files.train='{train}' has gold_calls"):
        build_envs(_run(tmp_path, train, test))
    ctx = _run(tmp_path, train, test)
    ctx.cfg.model.warm_start = False
    assert build_envs(ctx)["train"] == 1


# ---------------------------------------------------------------------------- the build-time gate
# A small handwritten environment per case, probed by ftrl.envs.gate.gate_candidates in the real
# sandbox: the good one passes, each broken one is refused with its reason and evidence in words.
def _city_tool(name: str = "get_city_temp", column: str = "temp", table: str = "{'PARIS': 21, 'OSLO': 4}",
               lookup: str = "key = city.strip().upper()", result: str = "table[key]",
               city_type: object = "string", extra: str = "") -> tuple[dict, str]:
    schema = {"type": "function", "function": {
        "name": name, "description": f"Get the {column} of a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": city_type, "description": "city name"}},
                       "required": ["city"]}}}
    if city_type == ["string", "array"]:
        schema["function"]["parameters"]["properties"]["city"]["items"] = {"type": "string"}
    code = (f"def {name}(city{extra}):\n"
            f"    table = {table}\n"
            "    if not isinstance(city, str):\n"
            "        raise TypeError(f'city must be a string, got {type(city).__name__}')\n"
            f"    {lookup}\n"
            "    if key not in table:\n"
            "        raise ValueError(f'unknown city {city!r}')\n"
            f"    return {{'city': key, '{column}': {result}}}\n")
    return schema, code


def _env(tools: list[tuple[dict, str]], turns: list[list[dict]], unsolved: dict, answer: str,
         invalid: list[dict] | None = None) -> env_gate.Candidate:
    record = {
        "messages": [{"role": "user", "content": "?"}],
        "tools": json.dumps([schema for schema, _ in tools]),
        "codes": json.dumps({schema["function"]["name"]: code for schema, code in tools}),
        "unsolved_set": json.dumps(unsolved), "solve_rate": 0.0, "answer": answer,
        "data_source": "Single-Hop" if len(turns) == 1 else "Multi-Hop", "split": "train",
        "gold_calls": json.dumps(turns),
    }
    probes = invalid if invalid is not None else [{"name": "get_city_temp", "arguments": {"city": "Atlantis"}}]
    return env_gate.Candidate(record, ("x",), probes, [])


def _paris(tool: tuple[dict, str] | None = None, answer: str = "21", **invalid) -> env_gate.Candidate:
    return _env([tool or _city_tool()], [[{"name": "get_city_temp", "arguments": {"city": "Paris"}}]],
                {"get_city_temp": [answer]}, answer, **invalid)


def _verdict(candidate: env_gate.Candidate, **options) -> env_gate.Rejection | None:
    [verdict] = env_gate.gate_candidates([candidate], timeout=5.0, **options)
    return verdict


def test_a_good_environment_passes_the_build_time_gate() -> None:
    assert _verdict(_paris()) is None
    # Lower-case, upper-case and padded city names were tried (and the one invalid probe).
    plan = env_gate._plan(_paris(), frozenset(env_gate.PROBE_CHECKS))
    assert [p.call["arguments"]["city"] for p in plan.probes] == ["paris", "PARIS", " Paris "]


def test_short_answers_that_match_by_accident_are_refused() -> None:
    # (1) The gold "21" occurs inside "214", another value the tool can return.
    inside_table = _verdict(_paris(_city_tool(table="{'PARIS': 21, 'OSLO': 214}")))
    assert inside_table.reason == env_gate.ACCIDENTAL_MATCH
    assert "sub-answer '21' of get_city_temp occurs inside the value '214' its code can return" in inside_table.detail
    # (2) One sub-answer inside another: "10" and "100".
    rain = _city_tool("get_city_rain", "rain", table="{'OSLO': 100, 'PARIS': 7}")
    both = _env([_city_tool(table="{'PARIS': 10, 'OSLO': 4}"), rain],
                [[{"name": "get_city_temp", "arguments": {"city": "Paris"}},
                  {"name": "get_city_rain", "arguments": {"city": "Oslo"}}]],
                {"get_city_temp": ["10"], "get_city_rain": ["100"]}, "10, 100")
    assert _verdict(both) == env_gate.Rejection(env_gate.ACCIDENTAL_MATCH, "sub-answer '10' occurs inside '100'")
    # (3) Only in the output: the tool appends a digit at run time, so "21" matches inside "215".
    suffixed = _verdict(_paris(_city_tool(result="str(table[key]) + '5'")))
    assert suffixed.reason == env_gate.ACCIDENTAL_MATCH
    assert "matches only inside a longer word of get_city_temp" in suffixed.detail and "215" in suffixed.detail


def test_an_answer_leaking_into_an_earlier_hop_is_refused() -> None:
    country = _city_tool("get_city_country", "country", table="{'LYON': 'FR'}")
    leaky_country = _city_tool("get_city_country", "country", table="{'LYON': 'FR'}",
                               result="table[key], 'capital': 'PARIS'")
    capital = ({"type": "function", "function": {
        "name": "get_country_capital", "description": "Get the capital of a country.",
        "parameters": {"type": "object", "properties": {"country": {"type": "string"}}, "required": ["country"]}}},
        ("def get_country_capital(country):\n"
         "    key = country.strip().upper()\n"
         "    if key != 'FR':\n"
         "        raise ValueError(f'unknown country {country!r}')\n"
         "    return {'country': key, 'capital': 'PARIS'}\n"))
    turns = [[{"name": "get_city_country", "arguments": {"city": "Lyon"}}],
             [{"name": "get_country_capital", "arguments": {"country": "FR"}}]]
    unsolved = {"get_city_country": ["FR"], "get_country_capital": ["PARIS"]}
    invalid = [{"name": "get_city_country", "arguments": {"city": "Atlantis"}}]
    assert _verdict(_env([country, capital], turns, unsolved, "PARIS", invalid)) is None
    leak = _verdict(_env([leaky_country, capital], turns, unsolved, "PARIS", invalid))
    assert leak.reason == env_gate.HOP_LEAK
    assert ("already holds 'PARIS', the sub-answer of get_country_capital({\"country\": \"FR\"}) (gold turn 2)"
            in leak.detail)


def test_a_non_deterministic_tool_is_refused() -> None:
    noisy = _city_tool(result="table[key], 'request': __import__('random').random()")
    verdict = _verdict(_paris(noisy))
    assert verdict.reason == env_gate.NONDETERMINISTIC
    assert verdict.detail.startswith('get_city_temp({"city": "Paris"}) returned ') and ", then " in verdict.detail


def test_an_error_that_does_not_say_what_was_wrong_is_refused() -> None:
    vague = _city_tool()[0], _city_tool()[1].replace("f'unknown city {city!r}'", "'invalid input'")
    verdict = _verdict(_paris(vague))
    assert verdict.reason == env_gate.ERROR_UNINFORMATIVE
    assert verdict.detail == ("get_city_temp({\"city\": \"Atlantis\"}) -> 'an error occured when call get_city_temp: "
                              "invalid input' names none of 'city', 'Atlantis', \"'Atlantis'\", '\"Atlantis\"'")
    # Python's own errors name the parameter: a missing argument is informative.
    missing = _paris(vague, invalid=[{"name": "get_city_temp", "arguments": {}}])
    assert _verdict(missing) is None
    assert env_gate.blamed({"name": "f", "arguments": {"city": 3, "zzz": 1}}, vague[0]["function"], []) == [
        "city", "3", "zzz"]


def test_case_and_space_variants_of_a_string_argument_must_work() -> None:
    exact = _city_tool(table="{'Paris': 21, 'Oslo': 4}", lookup="key = city")
    verdict = _verdict(_paris(exact))
    assert verdict.reason == env_gate.VARIANT_FAILS
    assert verdict.detail.startswith("city lower-cased: get_city_temp({\"city\": \"paris\"}) fails: ")
    # Enum values are exact spellings: no variants for them.
    enum_schema = json.loads(json.dumps(exact[0]))
    enum_schema["function"]["parameters"]["properties"]["city"]["enum"] = ["Paris", "Oslo"]
    assert _verdict(_paris((enum_schema, exact[1]))) is None
    assert _verdict(_paris(exact), checks=[c for c in env_gate.PROBE_CHECKS if c != env_gate.VARIANT_FAILS]) is None


def test_every_alternative_type_array_form_and_optional_parameter_is_called() -> None:
    # The schema offers an array of cities, but the code refuses lists.
    no_arrays = _verdict(_paris(_city_tool(city_type=["string", "array"])))
    assert no_arrays.reason == env_gate.SCALED_FEATURE_FAILS
    assert no_arrays.detail.startswith('city as array: get_city_temp({"city": ["Paris"]}) fails: ')
    # An optional parameter that breaks when set.
    schema, code = _city_tool(extra=", units='c'")
    schema["function"]["parameters"]["properties"]["units"] = {"type": "string", "enum": ["c", "f"]}
    broken = code.replace("    table =", "    if units == 'f':\n        raise NotImplementedError('todo')\n    table =")
    verdict = _verdict(_paris((schema, broken)))
    assert verdict.reason == env_gate.SCALED_FEATURE_FAILS and verdict.detail.startswith("optional units='f': ")
    working = code.replace("    table =", "    assert units in ('c', 'f'), units\n    table =")
    assert _verdict(_paris((schema, working))) is None
    probes = env_gate.feature_probes(schema["function"], {"name": "get_city_temp", "arguments": {"city": "Paris"}}, 0)
    assert [p.label for p in probes] == ["optional units='c'", "optional units='f'"]


def test_python_sources_parse_safely_from_many_threads() -> None:
    """CPython 3.11 fails concurrent ``ast.parse`` calls with "AST constructor recursion depth mismatch"
    when a thread switch lands inside the AST conversion (here forced by a tiny switch interval and
    garbage collections with finalisers); the builder's stages parse tool sources from a thread pool.
    """
    import gc
    import sys
    import threading

    class Finaliser:
        def __del__(self) -> None:
            [index for index in range(10)]

    source = "def f(x):\n" + "".join(f"    if x == {i}:\n        return [{{'a': ({i}, [1, {{2: 3}}])}}]\n" for i in range(60))
    errors: list[str] = []

    def parse_many() -> None:
        for _ in range(40):
            first, second = Finaliser(), Finaliser()
            first.other, second.other = second, first  # a cycle: only the collector frees it
            del first, second
            try:
                env_gate.parse_python(source)
            except SystemError as error:
                errors.append(str(error))

    interval, thresholds = sys.getswitchinterval(), gc.get_threshold()
    sys.setswitchinterval(1e-6)
    gc.set_threshold(5, 1, 1)
    try:
        threads = [threading.Thread(target=parse_many) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
        gc.set_threshold(*thresholds)
    assert errors == []
    assert env_gate.parse_python(source).body[0].name == "f"
