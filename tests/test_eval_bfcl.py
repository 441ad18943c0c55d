"""BFCL through the installed ``bfcl-eval`` package: the scorers on hand-written model outputs per
category (right and wrong), the leaderboard aggregation with stated numbers, the package's side
effects kept out of the tree, and an end-to-end run through the OpenAI-compatible engine against a
local stub server that answers with the gold calls (then resumes without a request).

CI installs the package: pip install --no-deps "bfcl-eval==2026.3.23" && pip install -e ".[bfcl]"

    OMP_NUM_THREADS=1 python -m pytest tests/test_eval_bfcl.py -q
"""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("bfcl_eval", reason='bfcl-eval is not installed: pip install --no-deps "bfcl-eval==2026.3.23" '
                                        '&& pip install -e ".[bfcl]"')

from openai_stub import Reply, StubServer, completion

from ftrl.eval import bfcl


def _entry(category: str, index: int = 0) -> dict:
    return bfcl.load_category(category, index + 1)[index]


def _choose(value):
    """The first acceptable value of a possible answer (nested dicts too); '' (optional) is left out."""
    if isinstance(value, dict):
        out = {}
        for key, options in value.items():
            pick = next((o for o in options if o != ""), None) if isinstance(options, list) else options
            if pick is not None:
                out[key] = _choose(pick)
        return out
    if isinstance(value, list):
        return [_choose(v) for v in value]
    return value


def gold_calls(sample: dict) -> list[dict]:
    return [{name: _choose(params)} for call in sample["ground_truth"] for name, params in call.items()]


def score(category: str, calls, index: int = 0) -> float:
    return bfcl.score_single_turn(_entry(category, index), calls)["accuracy"]


# ----------------------------------------------------------------------------- the package
def test_import_side_effects_stay_out_of_the_tree() -> None:
    bfcl.package()
    root = Path(os.environ[bfcl.PROJECT_ROOT_ENV])
    import bfcl_eval

    site = Path(bfcl_eval.__file__).resolve().parents[1]
    assert root != site and not (site / "result").exists() and not (site / "score").exists()
    assert not (Path.cwd() / "result").exists()
    # the checker's model table is a stand-in: the package's model handlers (openai, anthropic, ...) stay unimported
    import sys

    assert "bfcl_eval.constants.model_config" not in sys.modules


def test_categories_and_aliases() -> None:
    assert bfcl.expand_categories(["simple", "multiple", "simple_python"]) == [
        "simple_python", "simple_java", "simple_javascript", "multiple"]
    assert len(bfcl.expand_categories(["all"])) == 16
    with pytest.raises(ValueError, match="unknown category 'web_search'"):
        bfcl.expand_categories(["web_search"])
    sizes = {c: len(bfcl.load_category(c)) for c in ("simple_python", "simple_java", "simple_javascript",
                                                     "irrelevance", "multi_turn_base")}
    assert sizes == {"simple_python": 400, "simple_java": 100, "simple_javascript": 50, "irrelevance": 240,
                     "multi_turn_base": 200}


def test_tools_rename_dots_and_calls_restore_them() -> None:
    sample = _entry("simple_java")  # GeometryPresentation.createPresentation, parameters of type any
    tools, names = bfcl.to_tools(sample["function"])
    tool = tools[0]["function"]
    assert tool["name"] == "GeometryPresentation_createPresentation"
    assert tool["parameters"]["type"] == "object"
    assert {p["type"] for p in tool["parameters"]["properties"].values()} == {"string"}
    assert "Java 8 SDK syntax" in tool["description"]  # the package's language hint
    message = {"role": "assistant", "content": "", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "GeometryPresentation_createPresentation",
                                                     "arguments": '{"controller": "mapController", "parent": "mapArea"}'}}]}
    assert bfcl.calls_of(message, names) == [
        {"GeometryPresentation.createPresentation": {"controller": "mapController", "parent": "mapArea"}}]
    assert bfcl.calls_of({"role": "assistant", "content": "hi"}, names) == []
    broken = {"tool_calls": [{"function": {"name": "x", "arguments": "{not json"}}]}
    assert bfcl.calls_of(broken, names) is None
    assert bfcl.execute_strings([{"cd": {"folder": "doc"}}, {"ls": {}}]) == ["cd(folder='doc')", "ls()"]
    # BFCL types become JSON-schema types (dict -> object, float -> number, tuple -> array)
    tools, _ = bfcl.to_tools([{"name": "f", "description": "", "parameters": {"type": "dict", "properties": {
        "a": {"type": "float"}, "b": {"type": "tuple", "items": {"type": "dict", "properties": {"c": {"type": "any"}}}}}}}])
    props = tools[0]["function"]["parameters"]["properties"]
    assert (props["a"]["type"], props["b"]["type"], props["b"]["items"]["type"],
            props["b"]["items"]["properties"]["c"]["type"]) == ("number", "array", "object", "string")


# ----------------------------------------------------------------------------- single-turn scorers
def test_simple_python_right_and_wrong() -> None:
    # simple_python_0: calculate_triangle_area(base=10, height=5, unit='units' optional)
    assert score("simple_python", [{"calculate_triangle_area": {"base": 10, "height": 5}}]) == 1.0
    assert score("simple_python", [{"calculate_triangle_area": {"base": 10, "height": 5, "unit": "units"}}]) == 1.0
    assert score("simple_python", [{"calculate_triangle_area": {"base": 11, "height": 5}}]) == 0.0
    assert score("simple_python", [{"calculate_triangle_area": {"base": 10}}]) == 0.0  # missing required
    assert score("simple_python", [{"calculate_triangle_area": {"base": 10, "height": 5}}] * 2) == 0.0  # count
    assert score("simple_python", []) == 0.0 and score("simple_python", None) == 0.0
    verdict = bfcl.score_single_turn(_entry("simple_python"), [{"calculate_triangle_area": {"base": "10", "height": 5}}])
    assert verdict["accuracy"] == 0.0 and verdict["error"].startswith("type_error")


def test_simple_java_and_javascript_take_string_representations() -> None:
    # simple_java_0: GeometryPresentation.createPresentation(controller=mapController, parent=mapArea)
    assert score("simple_java", [{"GeometryPresentation.createPresentation": {
        "controller": "mapController", "parent": "mapArea"}}]) == 1.0
    # simple_java_1: SQLCompletionAnalyzer.makeProposalsFromObject(object=Customers, useShortName=true, ...)
    wrong = {"SQLCompletionAnalyzer.makeProposalsFromObject": {"object": "Customers", "useShortName": True,
                                                               "params": "{}"}}
    assert score("simple_java", [wrong], index=1) == 0.0  # a Java bool must come as the string "true"
    # simple_javascript_0: validateUserInput(inputField='userInputField', isComplete=true)
    assert score("simple_javascript", [{"validateUserInput": {"inputField": "userInputField", "isComplete": "true"}}]) == 1.0
    assert score("simple_javascript", [{"validateUserInput": {"inputField": "userInputField", "isComplete": True}}]) == 0.0
    assert score("simple_javascript", [{"validateUserInput": {"inputField": "other", "isComplete": "true"}}]) == 0.0


def test_multiple_parallel_and_parallel_multiple() -> None:
    # multiple_0: triangle_properties.get(side1=5, side2=4, side3=3) among two functions
    assert score("multiple", [{"triangle_properties.get": {"side1": 5, "side2": 4, "side3": 3}}]) == 1.0
    assert score("multiple", [{"circle_properties.get": {"side1": 5, "side2": 4, "side3": 3}}]) == 0.0
    # parallel_0: spotify.play twice, in any order
    first = {"spotify.play": {"artist": "Taylor Swift", "duration": 20}}
    second = {"spotify.play": {"artist": "Maroon 5", "duration": 15}}
    assert score("parallel", [second, first]) == 1.0
    assert score("parallel", [first]) == 0.0
    assert score("parallel", [first, {"spotify.play": {"artist": "Maroon 5", "duration": 16}}]) == 0.0
    sample = _entry("parallel_multiple")
    assert bfcl.score_single_turn(sample, gold_calls(sample))["accuracy"] == 1.0
    assert bfcl.score_single_turn(sample, gold_calls(sample)[:1])["accuracy"] == 0.0


def test_live_categories_right_and_wrong() -> None:
    for category in ("live_simple", "live_multiple", "live_parallel", "live_parallel_multiple"):
        sample = _entry(category)
        calls = gold_calls(sample)
        assert bfcl.score_single_turn(sample, calls)["accuracy"] == 1.0, category
        name, args = next(iter(calls[0].items()))
        key = next(iter(args))
        wrong = [{name: {**args, key: "surely-not-this"}}] + calls[1:]
        assert bfcl.score_single_turn(sample, wrong)["accuracy"] == 0.0, category
    # live_simple_0: get_user_info(user_id=7890, special='black'); strings are compared ignoring case, spaces and ,./-_*^
    assert score("live_simple", [{"get_user_info": {"user_id": 7890, "special": " Black."}}]) == 1.0


def test_irrelevance_is_right_without_a_call() -> None:
    for category in ("irrelevance", "live_irrelevance"):
        assert score(category, []) == 1.0
        assert score(category, None) == 1.0  # an undecodable call counts as no call
        assert score(category, [{}]) == 1.0
        assert score(category, [{"anything": {"x": 1}}]) == 0.0


# ----------------------------------------------------------------------------- multi-turn scorer
def test_multi_turn_gold_passes_and_wrong_fails_with_fresh_backends() -> None:
    from bfcl_eval.eval_checker.multi_turn_eval import multi_turn_utils

    for category in bfcl.MULTI_TURN:
        sample = _entry(category)
        gold_turns = [[turn] if turn else [] for turn in sample["ground_truth"]]
        assert bfcl.score_multi_turn(sample, gold_turns)["accuracy"] == 1.0, category
        assert bfcl.score_multi_turn(sample, gold_turns)["accuracy"] == 1.0, category  # no state carried over
    sample = _entry("multi_turn_base")  # turn 0: cd(document), mkdir(temp), mv(final_report.pdf -> temp)
    gold_turns = [[turn] for turn in sample["ground_truth"]]
    skipped = [[]] + gold_turns[1:]
    verdict = bfcl.score_multi_turn(sample, skipped)
    assert verdict["accuracy"] == 0.0 and "empty_turn_model_response" in verdict["error"]
    wrong_dir = [[["cd(folder='document')", "mkdir(dir_name='tmp')", "mv(source='final_report.pdf', destination='tmp')"]]]
    assert bfcl.score_multi_turn(sample, wrong_dir + gold_turns[1:])["accuracy"] == 0.0  # state differs
    assert bfcl.score_multi_turn(sample, gold_turns[:-1])["accuracy"] == 0.0  # a turn short
    assert bfcl.score_multi_turn(sample, gold_turns, force_terminated=True)["accuracy"] == 0.0
    assert not [name for name in vars(multi_turn_utils) if name.startswith("ftrl_")]  # cache cleared


# ----------------------------------------------------------------------------- aggregation
def _rows(category: str, values: list[float], failed: int = 0) -> list[dict]:
    return [{"group": category, "metrics": {"accuracy": v}, "failed": i < failed} for i, v in enumerate(values)]


def test_aggregation_follows_the_leaderboard() -> None:
    rows = (_rows("simple_python", [1, 0]) + _rows("simple_java", [1]) + _rows("simple_javascript", [0])
            + _rows("multiple", [1, 1]) + _rows("parallel", [0]) + _rows("parallel_multiple", [1])
            + _rows("live_simple", [1, 1, 0]) + _rows("live_multiple", [0])
            + _rows("irrelevance", [1]) + _rows("live_irrelevance", [0, 0])
            + _rows("multi_turn_base", [1]) + _rows("multi_turn_miss_func", [0], failed=1))
    metrics = bfcl.aggregate(rows)
    assert metrics["bfcl/simple_python/accuracy"] == 0.5 and metrics["bfcl/simple_python/n"] == 2
    assert metrics["bfcl/simple/accuracy"] == 0.5  # unweighted over python 0.5, java 1.0, javascript 0.0
    assert metrics["bfcl/non_live"] == 0.625  # (0.5 + 1 + 0 + 1) / 4: simple counts once
    assert metrics["bfcl/live"] == 0.5  # sample-weighted (2 + 0) / 4; unweighted would be 1/3
    assert metrics["bfcl/irrelevance"] == 0.5  # (1 + 0) / 2
    assert metrics["bfcl/multi_turn"] == 0.5
    assert metrics["bfcl/overall"] == pytest.approx((10 * 0.625 + 10 * 0.5 + 10 * 0.5 + 30 * 0.5) / 60)  # 0.5208
    assert metrics["bfcl/n"] == 17 and metrics["bfcl/failed"] == 1
    assert metrics["bfcl/multi_turn_miss_func/failed"] == 1
    only = bfcl.aggregate(_rows("live_parallel", [1, 0]))
    assert only["bfcl/live"] == 0.5 and only["bfcl/overall"] == 0.5 and "bfcl/non_live" not in only


# ----------------------------------------------------------------------------- end to end
def _gold_for_request(body: dict, golds: dict) -> dict:
    """The stub model: the gold calls of the entry (found by its first user line) and turn, else a text."""
    messages = body["messages"]
    first_user = next(m["content"] for m in messages if m["role"] == "user")
    turn = sum(1 for m in messages if m["role"] == "user") - 1

    def tool_count(sample: dict) -> int:  # base and miss_func entries share their first lines, not their tools
        held = sample.get("missed_function") or {}
        return len(sample["function"]) + sum(len(v) for k, v in held.items() if int(k) <= turn)

    def user_lines(sample: dict) -> list[str]:
        held = sample.get("missed_function") or {}
        return [line for t, lines in enumerate(sample["question"]) for line in
                ([bfcl.package().more_functions] if str(t) in held else [m["content"] for m in lines if m["role"] == "user"])]

    asked = [m["content"] for m in messages if m["role"] == "user"]
    candidates = [s for s in golds.get(first_user, []) if tool_count(s) == len(body.get("tools") or [])
                  and user_lines(s)[:len(asked)] == asked]
    if not candidates or messages[-1]["role"] == "tool":
        return completion("Done.")
    sample = candidates[0]
    if sample["category"] in bfcl.MULTI_TURN:
        strings = sample["ground_truth"][turn]
        held = [f for docs in (sample.get("missed_function") or {}).values() for f in docs]
        params = {f["name"]: list(f["parameters"]["properties"]) for f in sample["function"] + held}
        calls = []
        for text in strings:
            node = ast.parse(text, mode="eval").body
            args = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
            args.update({params[node.func.id][i]: ast.literal_eval(a) for i, a in enumerate(node.args)})
            calls.append((node.func.id, args))
    else:
        calls = [(name.replace(".", "_"), args) for call in gold_calls(sample) for name, args in call.items()]
    if not calls:
        return completion("I cannot do that with these functions.")
    return completion("", [{"id": f"call_{i}", "type": "function",
                            "function": {"name": name, "arguments": json.dumps(args)}}
                           for i, (name, args) in enumerate(calls)], finish_reason="tool_calls")


def test_end_to_end_through_the_openai_engine(tmp_path) -> None:
    from ftrl.config import RunConfig
    from ftrl.llm.engines import build_engine

    categories = ["simple_python", "parallel", "irrelevance", "live_simple", "multi_turn_base", "multi_turn_miss_func"]
    golds = {}
    for category in categories:
        if category not in bfcl.IRRELEVANCE:
            for sample in bfcl.load_category(category, 2):
                first = next(m["content"] for m in sample["question"][0] if m["role"] == "user")
                golds.setdefault(first, []).append(sample)

    with StubServer(lambda body: Reply(200, _gold_for_request(body, golds))) as server:
        cfg = RunConfig()
        cfg.model.engine, cfg.model.name, cfg.model.path = "openai", "api", "stub-model"
        cfg.model.api.base_url, cfg.model.api.api_key_env = server.base_url, ""
        cfg.eval.benchmarks = ["bfcl"]
        cfg.eval.bfcl.categories = categories
        cfg.eval.bfcl.max_per_category = 2
        cfg.eval.temperature = 0.0
        cfg.validate()
        engine = build_engine(cfg, cfg.model.path, batch_size=4)
        ctx = SimpleNamespace(cfg=cfg, run_dir=SimpleNamespace(
            eval_records=lambda checkpoint, name: tmp_path / checkpoint / f"{name}.jsonl"))
        metrics = bfcl.evaluate(ctx, engine, "base")
        requests = len(server.requests)
        again = bfcl.evaluate(ctx, engine, "base")  # resumed: every entry is done, nothing is asked
        assert len(server.requests) == requests
    assert again == metrics
    for category in categories:
        assert metrics[f"bfcl/{category}/accuracy"] == 1.0, category
        assert metrics[f"bfcl/{category}/n"] == 2
    assert metrics["bfcl/overall"] == 1.0 and metrics["bfcl/n"] == 12 and metrics["bfcl/failed"] == 0
    first = json.loads((tmp_path / "base" / "bfcl_simple_python.jsonl").read_text().splitlines()[0])
    assert first["calls"] == [{"calculate_triangle_area": {"base": 10, "height": 5, "unit": "units"}}]
    sent = server.requests[0]
    assert sent["tools"][0]["type"] == "function" and sent["temperature"] == 0.0
    row = json.loads((tmp_path / "base" / "bfcl_multi_turn_miss_func.jsonl").read_text().splitlines()[0])
    assert row["metrics"]["accuracy"] == 1.0 and len(row["calls"]) == 5 and row["calls"][2] == []
    # the holdout turn's user line is the package's, and the backends' results went back as tool messages
    assert any(m["role"] == "tool" for m in row["messages"])


def test_a_missing_package_is_a_clear_error(monkeypatch) -> None:
    from ftrl.errors import MissingInputError

    monkeypatch.setattr(bfcl, "_PACKAGE", {})
    monkeypatch.setattr(bfcl, "bfcl_available", lambda: False)
    with pytest.raises(MissingInputError, match=r'pip install --no-deps "bfcl-eval==2026.3.23"'):
        bfcl.load_category("simple_python")
