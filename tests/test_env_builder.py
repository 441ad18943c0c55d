"""The LLM environment builder end to end against a local OpenAI-compatible server (real HTTP).

The server (tests/builder_stub.py) answers every stage from recorded replies
(tests/fixtures/env_builder/replies.json) for nine seed tasks (fixtures/env_builder/seeds.jsonl). The
build runs with the builder's default knobs (complexity scaling on: ftrl.config.SCALING, seed 0), and
the replies were recorded for the strategies those knobs draw per task (FG functional generalisation,
PE parameter expansion, PTG parameter-type generalisation, D distractors):

====  ====================  ============  ====================================  ===============================
task  scenario              drawn         what the recorded replies do          expected
====  ====================  ============  ====================================  ===============================
t1    Single-Hop            FG PTG D2     decomposition fenced with a trailing  kept (repaired locally; scale
                                          comma; the first scale reply has no   after a repair request)
                                          selector parameter
t2    Multi-Hop             D2            first decomposition is prose          kept (after a repair request)
t3    Parallel Single-Hop   PE PTG D2     two per-city tools merged (2 -> 1)    kept (test split)
t4    Single-Hop            FG D2         the deployed tool raises on its gold  gate: gold_call_error
                                          call
t5    -                     -             near-duplicate of t1                  dedup: duplicate_question
t6    Single-Hop            -             decomposition invalid three times     decompose: schema_violation
t7    Single-Hop            FG PE PTG D2  a distractor returns the answer       gate: distractor_returns_answer
t8    Single-Hop            PE D2         the new optional parameter never      scale: scaling_not_applied
                                          gets a default (three replies)
t9    Single-Hop            PTG D2        the integer city id (an LLM-given     gate: scaled_call_wrong_answer
                                          alternative) returns another city
====  ====================  ============  ====================================  ===============================

    OMP_NUM_THREADS=1 python -m pytest tests/test_env_builder.py -q
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from builder_stub import SEEDS, BuilderServer, load_fixtures

from ftrl.builder import build_env_set
from ftrl.builder.builder import main as build_main
from ftrl.builder.gate import gate_envs
from ftrl.builder.llm import LazyEngine, Ledger, LLMCache, StageError, StructuredLLM
from ftrl.builder.prompts import PROMPT_DIR, load_prompts
from ftrl.builder.records import (
    Deployed,
    Documented,
    GoldCall,
    Probe,
    Scenario,
    SeedTask,
    SubQuestion,
    ToolSet,
    tool_name,
)
from ftrl.builder.scaling import ScaleCheck
from ftrl.builder.schema import check_tool_schema, classify_structure, parse_llm_json, validate
from ftrl.builder.stages import Knobs, StageContext, check_source, document, integrate, scale
from ftrl.config import SCALING, ConfigError, LLMBuildConfig, ProceduralConfig, RunConfig
from ftrl.envs.executor import StatefulExecutor
from ftrl.envs.io import read_records, validate_record
from ftrl.envs.procedural import generate_envs
from ftrl.envs.sets import format_env, list_sets, mix_sets, resolve_set, write_set
from ftrl.llm.engines.openai import Completion, MissingAPIKeyError
from ftrl.types import REFERENCE_FIELDS, count_answers

KEPT = {
    "train": ["What is the weather in Paris today?", "What is the population of the capital of France?"],
    "test": ["How many people live in Oslo and in Lima?"],
}
# t1 5 (a scale repair), t2 6 (a decompose repair), t3 5, t4 4, t6 3 (two repairs), t7 4, t8 5 (two scale
# repairs), t9 4; t5 none
REQUESTS_FIRST_BUILD = 36


def _config(server: BuilderServer, **overrides: Any) -> LLMBuildConfig:
    settings = {
        "model": "stub-builder",
        "seed_file": str(SEEDS),
        "backoff_base_s": 0.0,
        # Everything else, the complexity-scaling knobs included, is the builder's default.
        **overrides,
    }
    cfg = LLMBuildConfig(**settings)
    cfg.api.base_url, cfg.api.api_key_env, cfg.api.max_retries = server.base_url, "", 1
    cfg.api.price_per_mtok_in, cfg.api.price_per_mtok_out = 1.0, 2.0
    return cfg


def _questions(records: list[dict]) -> list[str]:
    return [record["messages"][0]["content"] for record in records]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Any]:
    """The first build, through the registry's envs=llm source, as a run would call it."""
    from ftrl.builder import env_source as llm

    sets_dir = tmp_path_factory.mktemp("sets")
    with BuilderServer() as server:
        run_config = RunConfig()
        run_config.envs.name = "llm"
        run_config.envs.sets_dir = str(sets_dir)
        run_config.envs.llm = _config(server)
        run_config.validate()
        records = llm(run_config)
        stages = list(server.stages)
        requests = list(server.requests)
    return {"records": records, "sets_dir": sets_dir, "stages": stages, "run_config": run_config,
            "requests": requests}


# ------------------------------------------------------------------------------------ acceptance
def test_the_pipeline_keeps_exactly_the_good_envs_and_reports_why(built) -> None:
    records = built["records"]
    assert {split: _questions(rows) for split, rows in records.items()} == KEPT
    assert len(built["stages"]) == REQUESTS_FIRST_BUILD
    env_set = resolve_set(records.manifest["set"], built["sets_dir"])
    report = env_set.report()
    flow = {s["stage"]: (s["entered"], s["passed"], s["failed"]) for s in report["stages"]}
    assert flow == {
        "dedup": (9, 8, {"duplicate_question": 1}),
        "decompose": (8, 7, {"schema_violation": 1}),
        "document": (7, 7, {}),
        "integrate": (7, 7, {}),
        "scale": (7, 6, {"scaling_not_applied": 1}),
        "deploy": (6, 6, {}),
        "gate": (6, 3, {"distractor_returns_answer": 1, "gold_call_error": 1, "scaled_call_wrong_answer": 1}),
    }
    why = {f["task_id"]: (f["stage"], f["reason"], f["detail"]) for f in report["failures"]}
    assert set(why) == {"t4_director", "t5_weather_again", "t6_tower", "t7_currency", "t8_brazil_language",
                        "t9_denver_elevation"}
    assert why["t4_director"][:2] == ("gate", "gold_call_error")
    assert "an error occured when call get_movie_info: 'Inception'" in why["t4_director"][2]
    assert (
        why["t5_weather_again"][:2] == ("dedup", "duplicate_question")
        and "t1_weather" in why["t5_weather_again"][2]
    )
    assert why["t6_tower"][:2] == ("decompose", "schema_violation")
    assert (
        "needs a non-empty answer" in why["t6_tower"][2] and "after 2 repair request(s)" in why["t6_tower"][2]
    )
    assert (
        why["t7_currency"][:2] == ("gate", "distractor_returns_answer")
        and '"currency": "JPY"' in why["t7_currency"][2]
    )
    assert why["t8_brazil_language"][:2] == ("scale", "scaling_not_applied")
    assert why["t8_brazil_language"][2].startswith(
        "not applied: parameter_expansion: new optional parameter 'script' of 'get_country_language' needs a "
        '"default"'
    )
    assert why["t9_denver_elevation"][:2] == ("gate", "scaled_call_wrong_answer")
    assert why["t9_denver_elevation"][2] == (
        "parameter_type_generalization: type integer of 'city' of 'get_city_elevation': "
        "get_city_elevation({\"city\": 2}) -> '{\"city\": \"Boulder\", \"elevation_m\": 1655}'; "
        "expected the sub-answer '1609'"
    )
    usage = report["usage"]["this_run"]
    assert (usage["requests"], usage["cache_hits"], usage["repairs"], usage["local_repairs"]) == (36, 0, 6, 1)
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (360, 180)  # 10 + 5 tokens per stub reply
    assert usage["cost_usd"] == pytest.approx((360 * 1.0 + 180 * 2.0) / 1e6)


def test_every_drawn_scaling_strategy_is_checked_and_counted(built) -> None:
    """Scaling is on by default; each drawn strategy is verified (stage 4) and exercised (gate), and counted."""
    env_set = resolve_set(built["records"].manifest["set"], built["sets_dir"])
    report = env_set.report()
    # drawn: tasks entering stage 4 the strategy was drawn for (t1 t2 t3 t4 t7 t8 t9, see the table above);
    # applied: stage 4 verified it; rejected: stage 4 (t8: PE) or the gate (t9: PTG, t7: distractors) blamed
    # it; kept: in the set (t1: FG PTG D, t2: D, t3: PE PTG D).
    assert report["scaling"] == {
        "functional_generalization": {"drawn": 3, "applied": 3, "rejected": 0, "kept": 1},
        "parameter_expansion": {"drawn": 3, "applied": 2, "rejected": 1, "kept": 1},
        "parameter_type_generalization": {"drawn": 4, "applied": 4, "rejected": 1, "kept": 2},
        "distractors": {"drawn": 7, "applied": 6, "rejected": 1, "kept": 3},
    }
    assert env_set.manifest["scaling"] == report["scaling"]
    blamed = {f["task_id"]: f["strategies"] for f in report["failures"] if f["strategies"]}
    assert blamed == {"t7_currency": ["distractors"], "t8_brazil_language": ["parameter_expansion"],
                      "t9_denver_elevation": ["parameter_type_generalization"]}
    envs = {row["task_id"]: row for row in report["envs"]}
    assert {k: (v["strategies"], v["probes"]) for k, v in envs.items()} == {
        # t1: field='temperature_c' and 'humidity' (any fact), city=['Paris'] (must say 'sunny')
        "t1_weather": (["functional_generalization", "parameter_type_generalization", "distractors"], 3),
        "t2_capital_population": (["distractors"], 0),
        # t3: include_area=False and city=[...] for each of the two calls
        "t3_two_cities": (["parameter_expansion", "parameter_type_generalization", "distractors"], 4),
    }
    # t1's first scale reply had no selector parameter: the repair request named the missing strategy.
    scale_requests = [body for body in built["requests"] if "stage: scale" in body["messages"][1]["content"]
                      and "weather in Paris" in body["messages"][1]["content"]]
    assert len(scale_requests) == 2 and "functional generalisation was drawn but no tool got a new selector " \
        "parameter" in scale_requests[1]["messages"][-1]["content"]


def test_stage2_writes_one_tool_per_sub_question_and_stage3_records_merged_from(built) -> None:
    report = resolve_set(built["records"].manifest["set"], built["sets_dir"]).report()
    envs = {row["task_id"]: row for row in report["envs"]}
    # t3: stage 2 wrote one tool per city, stage 3 merged them (2 -> 1), stage 4 kept the name.
    assert envs["t3_two_cities"]["documented_tools"] == ["get_lima_population", "get_oslo_population"]
    assert envs["t3_two_cities"]["tools"] == ["get_city_population"]
    assert envs["t3_two_cities"]["merged_from"] == {
        "get_city_population": ["get_lima_population", "get_oslo_population"]
    }
    # t2: two tools doing different things stay apart; t1: one tool (no integrate request), renamed by
    # functional generalisation in stage 4 and still traced to its stage-2 tool.
    assert envs["t2_capital_population"]["merged_from"] == {
        "get_capital": ["get_capital"], "get_city_population": ["get_city_population"]
    }
    assert envs["t1_weather"]["merged_from"] == {"get_weather_info": ["get_weather"]}
    # Integrate is asked only where stage 2 wrote more than one tool: t2 and t3 of the tasks that got there.
    assert built["stages"].count("integrate") == 2


def test_records_are_reference_records_with_gold_calls(built) -> None:
    train, test = built["records"]["train"], built["records"]["test"]
    for index, record in enumerate(train + test):
        validate_record(record, f"llm #{index}")
        assert list(record) == list(REFERENCE_FIELDS) + ["gold_calls"]
    weather, capital = train
    assert (weather["data_source"], weather["answer"]) == ("Single-Hop", "sunny")
    assert json.loads(weather["unsolved_set"]) == {"get_weather_info": ["sunny"]}
    assert json.loads(weather["gold_calls"]) == [
        [{"name": "get_weather_info", "arguments": {"city": "Paris", "field": "condition"}}]
    ]
    # Tools are listed in an order seeded per task: answering tools and distractors mixed.
    names = {_questions([r])[0]: [t["function"]["name"] for t in json.loads(r["tools"])] for r in train + test}
    assert names == {
        KEPT["train"][0]: ["get_weather_info", "get_air_quality", "get_city_timezone"],
        KEPT["train"][1]: ["get_city_area", "get_city_population", "get_capital", "get_country_currency"],
        KEPT["test"][0]: ["get_city_area", "get_city_mayor", "get_city_population"],
    }
    assert json.loads(capital["gold_calls"]) == [
        [{"name": "get_capital", "arguments": {"country": "France"}}],
        [{"name": "get_city_population", "arguments": {"city": "Paris"}}],
    ]
    [cities] = test
    assert cities["data_source"] == "Parallel Single-Hop" and cities["answer"] == "709037, 10092000"
    assert json.loads(cities["unsolved_set"]) == {"get_city_population": ["709037", "10092000"]}
    assert json.loads(cities["gold_calls"]) == [
        [
            {"name": "get_city_population", "arguments": {"city": "Oslo"}},
            {"name": "get_city_population", "arguments": {"city": "Lima"}},
        ]
    ]


def test_the_set_is_versioned_with_a_manifest(built) -> None:
    records = built["records"]
    env_set = resolve_set("llm", built["sets_dir"])
    assert env_set.path == Path(records.manifest["set_path"])
    assert env_set.ref == f"llm-{env_set.hash}" and len(env_set.hash) == 16
    assert read_records(env_set.path / "train.jsonl") == records["train"]
    manifest = env_set.manifest
    assert manifest["builder"]["model"] == "stub-builder"
    assert (
        manifest["prompts"]["decompose"]
        == hashlib.sha256((PROMPT_DIR / "decompose.txt").read_bytes()).hexdigest()
    )
    assert manifest["knobs"] == {  # the builder's defaults: ftrl.config.SCALING
        "functional_generalization": 0.5, "parameter_expansion": 0.5, "parameter_type_generalization": 0.5,
        "min_distractors": 1, "max_distractors": 2, "seed": 0,
    }
    assert manifest["counts"]["test"] == {"Parallel Single-Hop": 1}
    assert manifest["statistics"]["train"]["Multi-Hop"] == {
        "count": 1.0,
        "mean_sub_answers": 2.0,
        "mean_tools": 4.0,
        "mean_distractors": 2.0,
        "mean_gold_turns": 2.0,
        "mean_gold_calls": 2.0,
    }
    assert manifest["usage"]["total"]["total_prompt_tokens"] == 360
    assert manifest["seeds"]["seed_file_sha256"] == hashlib.sha256(SEEDS.read_bytes()).hexdigest()


def test_rebuilding_with_the_same_inputs_sends_no_request(built, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("FTRL_NO_SUCH_KEY", raising=False)
    with BuilderServer() as server:
        cfg = _config(server)
        cfg.api.api_key_env = "FTRL_NO_SUCH_KEY"  # a cached build needs no key (and no server)
        again = build_env_set(cfg, sets_dir=built["sets_dir"])
        with pytest.raises(MissingAPIKeyError, match="FTRL_NO_SUCH_KEY is not set"):
            build_env_set(cfg, sets_dir=tmp_path)  # an empty cache needs the endpoint: a clear error, once
    assert server.requests == []
    assert again.env_set.path == Path(built["records"].manifest["set_path"])
    assert again.records == dict(built["records"])
    assert (
        again.report.usage["this_run"]["requests"] == 0 and again.report.usage["this_run"]["cache_hits"] == 36
    )
    assert again.report.usage["total"]["total_prompt_tokens"] == 360  # what the set cost when it was built
    assert [(f.task_id, f.reason) for f in again.report.failures] == [
        (f["task_id"], f["reason"]) for f in resolve_set("llm", built["sets_dir"]).report()["failures"]
    ]


def test_an_endpoint_outage_is_reported_and_the_next_run_resumes(tmp_path: Path, capsys) -> None:
    with BuilderServer() as server:
        server.down.add(("document", "What is the population of the capital of France?"))
        first = build_env_set(_config(server), sets_dir=tmp_path)
        assert (
            len(server.requests) == REQUESTS_FIRST_BUILD - 6 + 4
        )  # t2: decompose x2, document x2 (a retry), stop
    [outage] = [f for f in first.report.failures if f.task_id == "t2_capital_population"]
    assert (outage.stage, outage.reason, outage.transient) == ("document", "api_error", True)
    assert "failed after 2 attempts: HTTP 503" in outage.detail
    assert _questions(first.records["train"]) == KEPT["train"][:1]

    with BuilderServer() as server:  # the CLI, on the same cache: only t2's missing stages are asked for
        code = build_main(
            [
                f"seed_file={SEEDS}",
                "model=stub-builder",
                f"api.base_url={server.base_url}",
                "api.api_key_env=",
                "backoff_base_s=0",  # no scaling flag: the CLI's defaults scale as _config's do
                "--sets-dir",
                str(tmp_path),
            ]
        )
        assert code == 0
        assert server.stages == ["document", "integrate", "scale", "deploy"]
    out = capsys.readouterr().out
    assert "kept train=2, test=1" in out
    # (the stored path, not resolve_set("llm"): two builds within one second tie on "created")
    stored = next(line.removeprefix("stored ") for line in out.splitlines() if line.startswith("stored "))
    assert {s.ref for s in list_sets(tmp_path)} == {first.env_set.ref, Path(stored).name}
    assert first.env_set.ref != Path(stored).name


def test_procedural_and_llm_records_run_unchanged_through_collector_evaluator_and_warm_start(
    built, tmp_path
) -> None:
    """One format: both builders' records go through collection, evaluation and warm start (API policy)."""
    from ftrl.collect import collect_snapshots
    from ftrl.eval.own_test import evaluate_own_test
    from ftrl.llm.engines.base import SamplingParams
    from ftrl.llm.engines.openai import OpenAIEngine
    from ftrl.llm.parsers import get_parser
    from ftrl.train.warmup import gold_examples

    procedural = generate_envs(ProceduralConfig(num_train=4, num_test=2, max_hops=2), seed=3).records
    llm = built["records"]
    for source in (procedural, llm):
        assert all(
            list(r) == list(REFERENCE_FIELDS) + ["gold_calls"] for rows in source.values() for r in rows
        )
    assert {type(v) for r in procedural["train"] for v in r.values()} == {
        type(v) for r in llm["train"] for v in r.values()
    }

    execute = StatefulExecutor(timeout=10.0)  # the executor collection, eval and the warm start use

    params = SamplingParams(temperature=0.0, max_new_tokens=64)
    with BuilderServer() as server:
        server.learn(procedural["train"] + procedural["test"] + llm["train"] + llm["test"])
        engine = OpenAIEngine("stub-policy", server.base_url, api_key="", concurrency=4)
        for name, source in (("procedural", procedural), ("llm", llm)):
            out = tmp_path / name
            stats = collect_snapshots(
                engine,
                source["train"],
                out / "snapshots.jsonl",
                params=params,
                max_turns=5,
                parser=get_parser("qwen"),
                execute=execute,
                batch_size=8,
            )
            turns = [len(json.loads(r["gold_calls"])) for r in source["train"]]
            assert stats["mean_solve_rate"] == 1.0
            assert stats["snapshots_written"] == sum(turns) + len(turns)  # the env, then one per calling turn
            snapshots = read_records(out / "snapshots.jsonl")
            assert (
                snapshots[-1]["solve_rate"] == 1.0
                and count_answers(json.loads(snapshots[-1]["unsolved_set"])) == 0
            )
            metrics = evaluate_own_test(
                engine,
                source["test"],
                out / "eval.jsonl",
                params=params,
                max_turns=5,
                parser=get_parser("qwen"),
                execute=execute,
                batch_size=8,
            )
            assert metrics["ftrl_test/solve_r"] == 1.0 and metrics["ftrl_test/solve_p"] == 1.0
            assert metrics["ftrl_test/n"] == float(len(source["test"]))
            examples = gold_examples(source["train"], execute)
            assert len(examples) == sum(turns) + len(turns)
            assert examples[-1].target.startswith("The answer is ")


def test_a_reference_model_must_solve_each_env(tmp_path: Path) -> None:
    with BuilderServer() as server:
        first = build_env_set(_config(server), sets_dir=tmp_path, write=False)
        server.learn(first.records["train"] + first.records["test"])
        server.refuse.add("What is the population of the capital of France?")
        checked = build_env_set(
            _config(server, reference_check=True, reference_max_turns=3), sets_dir=tmp_path
        )
    assert _questions(checked.records["train"]) == KEPT["train"][:1]
    assert _questions(checked.records["test"]) == KEPT["test"]
    [refused] = [f for f in checked.report.failures if f.stage == "reference"]
    assert (refused.task_id, refused.reason) == ("t2_capital_population", "reference_model_failed")
    assert refused.detail == "solved 0/2 sub-answers with 0 call(s) in 1 turn(s) (limit 3)"
    assert checked.report.stages[-1].stage == "reference" and checked.report.stages[-1].entered == 3


# ------------------------------------------------------------------------------------ sets
def test_sets_list_show_and_mix(built, tmp_path: Path) -> None:
    from ftrl.envs.sets import main as sets_main
    from ftrl.envs.sources import env_set

    sets_dir = tmp_path / "sets"
    llm_set = resolve_set("llm", built["sets_dir"])
    copied = write_set(llm_set.all_records(), name="llm", sets_dir=sets_dir, manifest={"source": "llm"})
    procedural = generate_envs(ProceduralConfig(num_train=10, num_test=3, max_hops=2), seed=1).records
    stored = write_set(procedural, name="procedural-10", sets_dir=sets_dir, manifest={"source": "procedural"})
    assert [s.ref for s in list_sets(sets_dir)] == [copied.ref, stored.ref]

    mixed = mix_sets({"llm": 2.0, "procedural-10": 0.5}, sets_dir, seed=0)
    assert (len(mixed["train"]), len(mixed["test"])) == (2 * 2 + 5, 1 + 3)
    assert [(c["set"], c["train"], c["test"]) for c in mixed.manifest["mix"]] == [
        (copied.ref, 4, 1),
        (stored.ref, 5, 3),
    ]
    run_config = RunConfig()
    run_config.envs.name, run_config.envs.sets_dir = "set", str(sets_dir)
    run_config.envs.mix = {copied.ref: 1.0, "procedural": 1.0}
    with pytest.raises(LookupError, match="no env set 'procedural'.*did you mean 'procedural-10'"):
        env_set(run_config)
    run_config.envs.mix = {copied.ref[:8]: 1.0, stored.path.as_posix(): 1.0}  # a unique prefix and a path
    assert len(env_set(run_config)["train"]) == 2 + 10
    run_config.envs.mix = {}
    with pytest.raises(ValueError, match="envs.mix is empty"):
        env_set(run_config)

    text = format_env(llm_set.records("test")[0], execute=StatefulExecutor())
    assert "tools (1 answering, 2 distractor):" in text and "get_city_mayor(city: string)" in text
    assert "get_city_population(city: string|array, include_area: boolean = ...)" in text
    assert text.count("[solves a sub-answer]") == 2 and "unsolved after the gold chain: 0" in text
    assert (
        sets_main(
            ["--sets-dir", str(sets_dir), "show", "llm", "--split", "train", "--index", "1", "--no-codes"]
        )
        == 0
    )
    assert sets_main(["--sets-dir", str(sets_dir), "show", "nothing"]) == 2


# ------------------------------------------------------------------------------------ parts
class ScriptedEngine:
    """Stands in for OpenAIEngine.chat: replies in order, recording the conversations it was sent."""

    def __init__(self, replies: list[str]) -> None:
        self.replies = list(replies)
        self.sent: list[list[dict]] = []

    def chat(self, messages, **kwargs) -> list[Completion]:
        self.sent.append(messages)
        text = self.replies.pop(0)
        return [
            Completion(text, {"role": "assistant", "content": text, "tool_calls": None}, "stop", 7, 3, 0.0)
        ]


def _structured(
    tmp_path: Path, replies: list[str], max_repairs: int = 2
) -> tuple[StructuredLLM, ScriptedEngine]:
    engine = ScriptedEngine(replies)
    prompts = load_prompts()
    return StructuredLLM(
        LazyEngine(lambda: engine),
        LLMCache(tmp_path / "cache"),
        model="m",
        repair_prompt=prompts["repair"],
        max_repairs=max_repairs,
    ), engine


def test_parse_and_validate_structured_replies() -> None:
    assert parse_llm_json('{"a": 1}') == ({"a": 1}, False, None)
    assert parse_llm_json('Sure:\n```json\n{"a": [1, 2,],}\n```') == ({"a": [1, 2]}, True, None)
    assert parse_llm_json('{"a": "cut') == ({"a": "cut"}, True, None)
    value, _repaired, error = parse_llm_json("no json here")
    assert value is None and "not JSON" in error
    schema = {
        "type": "object",
        "required": ["x", "y"],
        "properties": {"x": {"type": "integer"}, "y": {"type": "array", "minItems": 1}},
    }
    assert validate({"x": True, "y": []}, schema) == [
        "$.x: expected integer, got boolean",
        "$.y: needs at least 1 item(s), got 0",
    ]
    assert validate({"y": [1]}, schema) == ["$: missing required key 'x'"]
    assert classify_structure({"a": []}) == "Single-Hop"
    assert classify_structure({"a": [], "b": []}) == "Parallel Single-Hop"
    assert classify_structure({"a": [], "b": ["a"], "c": ["b"]}) == "Multi-Hop"
    assert classify_structure({"a": [], "b": ["a"], "c": [], "d": ["c"]}) == "Parallel Multi-Hop"
    bad_tool = {
        "type": "function",
        "function": {
            "name": "get-x",
            "description": "",
            "parameters": {"type": "object", "properties": {"q": {"type": "text"}}, "required": ["z"]},
        },
    }
    assert check_tool_schema(bad_tool) == [
        "tool: name 'get-x' must be a Python identifier (letters, digits, _; at most 64)",
        "tool '?': needs a non-empty description",
        ("tool '?': parameter 'q' has type 'text'; valid: ['array', 'boolean', 'integer', 'null', 'number', "
        "'object', 'string'] or a list of them"),
        "tool '?': parameters.required ['z'] must list declared properties (['q'])",
    ]


def test_repairs_are_bounded_and_cached(tmp_path: Path) -> None:
    llm, engine = _structured(tmp_path, ["oops", '{"n": "two"}', '{"n": 2}'])
    ledger = Ledger()

    def check(value):
        return validate(value, {"type": "object", "required": ["n"],
                                "properties": {"n": {"type": "integer"}}})

    assert llm.ask("give n", check, ledger) == {"n": 2}
    assert (ledger.requests, ledger.repairs, ledger.prompt_tokens) == (3, 2, 21)
    assert "$.n: expected integer, got string" in engine.sent[2][-1]["content"]  # the repair quotes the error
    again, _ = _structured(tmp_path, [])
    ledger2 = Ledger()
    assert again.ask("give n", check, ledger2) == {"n": 2}  # replayed from the cache, nothing sent
    assert (ledger2.requests, ledger2.cache_hits, ledger2.total_prompt_tokens) == (0, 3, 21)
    failing, _ = _structured(tmp_path / "other", ["{}", "{}"], max_repairs=1)
    with pytest.raises(
        StageError, match="schema_violation: \\$: missing required key 'n' \\(after 1 repair request"
    ):
        failing.ask("give n", check, Ledger())


def test_deployed_source_must_be_one_function_taking_the_schema() -> None:
    tool = {
        "type": "function",
        "function": {
            "name": "f",
            "description": "d",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "string"}, "b": {"type": "integer"}},
                "required": ["a"],
            },
        },
    }
    assert check_source("f", "def f(a, b=1):\n    return a\n", tool) == []
    assert check_source("f", "import json\ndef f(a, b=1):\n    return a\n", tool)[0].startswith(
        "codes['f'] has top-level statements besides `def f` (Import)"
    )
    assert check_source("f", "def f(a, b):\n    return a\n", tool) == [
        "`def f`: optional parameter(s) ['b'] need default values"
    ]
    assert check_source("f", "def f(a):\n    return a\n", tool) == [
        "`def f` does not accept parameter(s) ['b'] of its schema"
    ]
    assert check_source("f", "def g(a, b=1): pass", tool) == ["codes['f'] must define `def f(...)`"]
    assert check_source("f", "def f(:", tool)[0].startswith("codes['f'] is not valid Python")


def test_scaling_knobs_are_drawn_per_task_and_checked(tmp_path: Path) -> None:
    # The default is the one shared default (ftrl.config.SCALING): every environment gets 1-2 distractors and
    # each other strategy with probability 0.5, so no environment is left unscaled.
    assert Knobs() == Knobs(SCALING.functional_generalization, SCALING.parameter_expansion,
                            SCALING.parameter_type_generalization, SCALING.min_distractors, SCALING.max_distractors)
    defaults = [Knobs().draw(f"task{i}") for i in range(400)]
    assert all("distractors" in drawn and 1 <= n <= 2 for drawn, n in defaults)
    for strategy in ("functional_generalization", "parameter_expansion", "parameter_type_generalization"):
        assert 160 <= sum(strategy in drawn for drawn, _ in defaults) <= 240
    assert Knobs(0.0, 0.0, 0.0, 0, 0).draw("t") == ([], 0)
    assert Knobs(1.0, 1.0, 1.0, 2, 2).draw("t") == (
        ["functional_generalization", "parameter_expansion", "parameter_type_generalization", "distractors"],
        2,
    )
    half = Knobs(0.0, 0.5, 0.0, 0, 0, seed=1)
    draws = [half.draw(f"task{i}")[0] for i in range(200)]
    assert draws == [half.draw(f"task{i}")[0] for i in range(200)]  # seeded per task
    assert 80 <= sum(1 for d in draws if d == ["parameter_expansion"]) <= 120

    tool = {
        "type": "function",
        "function": {
            "name": "get_x",
            "description": "d",
            "parameters": {"type": "object", "properties": {"k": {"type": "string"}}, "required": ["k"]},
        },
    }
    scenario = Scenario(
        SeedTask("t", "What is x of A?", "test"), "Single-Hop", [SubQuestion("q1", "x of A?", "7")], "7"
    )
    same = json.dumps(
        {
            "tools": [tool],
            "calls": [{"sub_question_id": "q1", "name": "get_x", "arguments": {"k": "A"}}],
            "distractors": [],
        }
    )
    llm, engine = _structured(tmp_path, [same] * 3)
    ctx = StageContext(llm, load_prompts(), Knobs(0.0, 1.0, 0.0, 0, 0), concurrency=1)
    outputs, failures = scale([ToolSet(scenario, [tool], [GoldCall("q1", "get_x", {"k": "A"})])], ctx)
    assert outputs == [] and [(f.stage, f.reason, f.strategies) for f in failures] == [
        ("scale", "scaling_not_applied", ["parameter_expansion"])
    ]
    assert failures[0].detail.startswith(
        "not applied: parameter_expansion: parameter expansion was drawn but no tool got a new optional parameter"
    )
    assert "Parameter expansion: add parameters" in engine.sent[0][1]["content"]
    assert len(engine.sent) == 3  # the first request and two repair requests naming what is missing


def _tool(name: str, properties: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {"name": name, "description": f"{name} tool",
                                             "parameters": {"type": "object", "properties": properties,
                                                            "required": required}}}


def _two_hop_scenario() -> Scenario:
    return Scenario(SeedTask("t", "How many people live in Oslo and in Lima?", "test"), "Parallel Single-Hop",
                    [SubQuestion("q1", "Population of Oslo?", "709037"),
                     SubQuestion("q2", "Population of Lima?", "10092000")], "709037, 10092000")


def test_document_stage_writes_exactly_one_tool_per_sub_question(tmp_path: Path) -> None:
    city = {"city": {"type": "string"}}
    shared = _tool("get_city_population", city, ["city"])
    one_tool = json.dumps({"tools": [
        {"sub_question_id": "q1", "tool": shared, "arguments": {"city": "Oslo"}},
        {"sub_question_id": "q2", "tool": shared, "arguments": {"city": "Lima"}},
    ]})
    two_tools = json.dumps({"tools": [
        {"sub_question_id": "q1", "tool": _tool("get_oslo_population", {}, []), "arguments": {}},
        {"sub_question_id": "q2", "tool": _tool("get_lima_population", {}, []), "arguments": {}},
    ]})
    llm, engine = _structured(tmp_path, [one_tool, two_tools])
    ctx = StageContext(llm, load_prompts(), Knobs(), concurrency=1)
    [documented], failures = document([_two_hop_scenario()], ctx)
    assert failures == [] and len(engine.sent) == 2
    assert "exactly 2 tools for the 2 sub-questions" in engine.sent[0][1]["content"]
    assert "tool name(s) ['get_city_population'] are used for several sub-questions" in engine.sent[1][-1]["content"]
    assert [tool_name(t) for t in documented.tools] == ["get_oslo_population", "get_lima_population"]
    assert [(c.sub_question_id, c.name) for c in documented.calls] == [
        ("q1", "get_oslo_population"), ("q2", "get_lima_population")
    ]


def test_integrate_derives_merged_from_and_checks_the_replys_claim(tmp_path: Path) -> None:
    scenario = _two_hop_scenario()
    item = Documented(scenario, [_tool("get_oslo_population", {}, []), _tool("get_lima_population", {}, [])],
                      [GoldCall("q1", "get_oslo_population", {}), GoldCall("q2", "get_lima_population", {})])
    merged = _tool("get_city_population", {"city": {"type": "string"}}, ["city"])
    calls = [{"sub_question_id": "q1", "name": "get_city_population", "arguments": {"city": "Oslo"}},
             {"sub_question_id": "q2", "name": "get_city_population", "arguments": {"city": "Lima"}}]
    wrong = json.dumps({"tools": [merged], "calls": calls,
                        "merged_from": {"get_city_population": ["get_oslo_population"]}})
    right = json.dumps({"tools": [merged], "calls": calls,
                        "merged_from": {"get_city_population": ["get_oslo_population", "get_lima_population"]}})
    llm, engine = _structured(tmp_path, [wrong, right])
    [toolset], failures = integrate([item], StageContext(llm, load_prompts(), Knobs(), concurrency=1))
    assert failures == []
    assert toolset.merged_from == {"get_city_population": ["get_lima_population", "get_oslo_population"]}
    assert toolset.documented == {"q1": "get_oslo_population", "q2": "get_lima_population"}
    assert ('$.merged_from is {"get_city_population": ["get_oslo_population"]} but the calls say '
            '{"get_city_population": ["get_lima_population", "get_oslo_population"]}') in engine.sent[1][-1]["content"]


def test_scale_check_verifies_each_strategy_and_derives_its_probes() -> None:
    before = [_tool("get_x", {"k": {"type": "string"}}, ["k"])]
    before_calls = [GoldCall("q1", "get_x", {"k": "A"})]
    properties = {
        "k": {"type": ["string", "array", "integer"], "items": {"type": "string"}},
        "field": {"type": "string", "enum": ["x", "y", "z"]},
        "unit": {"type": "string", "enum": ["m", "ft"], "default": "m"},
        "verbose": {"type": "boolean"},
    }
    after = [_tool("get_x_info", properties, ["k", "field"])]
    calls = [{"sub_question_id": "q1", "name": "get_x_info", "arguments": {"k": "A", "field": "x"}}]
    strategies = ["functional_generalization", "parameter_expansion", "parameter_type_generalization"]
    judged = ScaleCheck(strategies, before, before_calls, after, calls).run()
    assert judged.errors == {
        "parameter_expansion": [("new optional parameter 'verbose' of 'get_x_info' needs a \"default\" of its type "
                                "(or an \"enum\"/\"examples\"), so that it can be called")],
        "parameter_type_generalization": [
            ("parameter 'k' of 'get_x_info' accepts ['string', 'array', 'integer'] but no call passes it as integer: "
            'add {"sub_question_id", "parameter": "k", "value"} to "alternatives" with the gold value as integer')],
    }
    properties["verbose"]["default"] = False
    fixed = ScaleCheck(strategies, before, before_calls, after, calls,
                       [{"sub_question_id": "q1", "parameter": "k", "value": 7}]).run()
    assert fixed.errors == {}
    assert [(p.strategy, p.parameter, p.arguments, p.expect_answer) for p in fixed.probes] == [
        ("functional_generalization", "field", {"k": "A", "field": "y"}, False),
        ("functional_generalization", "field", {"k": "A", "field": "z"}, False),
        ("parameter_expansion", "unit", {"k": "A", "field": "x", "unit": "m"}, True),
        ("parameter_expansion", "verbose", {"k": "A", "field": "x", "verbose": False}, True),
        ("parameter_type_generalization", "k", {"k": ["A"], "field": "x"}, True),
        ("parameter_type_generalization", "k", {"k": 7, "field": "x"}, True),
    ]
    assert fixed.features == {"get_x_info.field": "functional_generalization", "get_x_info.unit": "parameter_expansion",
                              "get_x_info.verbose": "parameter_expansion",
                              "get_x_info.k": "parameter_type_generalization"}
    # Nothing new: every drawn strategy is missing, each with its reason.
    unscaled = ScaleCheck(strategies, before, before_calls, before,
                          [{"sub_question_id": "q1", "name": "get_x", "arguments": {"k": "A"}}]).run()
    assert sorted(unscaled.errors) == sorted(strategies)
    no_items = [_tool("get_x", {"k": {"type": ["string", "array"]}}, ["k"])]
    assert ScaleCheck(["parameter_type_generalization"], before, before_calls, no_items,
                      [{"sub_question_id": "q1", "name": "get_x", "arguments": {"k": "A"}}]).run().errors == {
        "parameter_type_generalization": [("parameter 'k' of 'get_x' accepts an array but declares no \"items\" "
                                          "(OpenAI tool schemas need it)")]}


def _town_env(code: str) -> Deployed:
    tool = _tool("get_town", {"k": {"type": ["string", "array"], "items": {"type": "string"}}}, ["k"])
    scenario = Scenario(SeedTask("town", "Which town is alpha?", "test"), "Single-Hop",
                        [SubQuestion("q1", "Town of alpha?", "Kiruna")], "Kiruna")
    call = GoldCall("q1", "get_town", {"k": "alpha"})
    probe = Probe("parameter_type_generalization", "array form of 'k' of 'get_town'", "k", "q1", "get_town",
                  {"k": ["alpha"]})
    toolset = ToolSet(scenario, [tool], [call], {"get_town": ["get_town"]},
                      strategies=["parameter_type_generalization"], probes=[probe], documented={"q1": "get_town"},
                      features={"get_town.k": "parameter_type_generalization"})
    return Deployed(toolset, {"get_town": code})


TOWN_CODE = """def get_town(k):
    table = {'alpha': 'Kiruna', 'beta': 'Lund'}
    def one(key):
        if not isinstance(key, str):
            raise TypeError(f'k must be a string or a list of strings, got {type(key).__name__} {key!r}')
        if key.strip().lower() not in table:
            raise ValueError(f'unknown k {key!r}; known: {sorted(table)}')
        return table[key.strip().lower()]
    if isinstance(k, list):
        return {'towns': [one(item) for item in k]}
    return {'k': k.strip(), 'town': one(k)}
"""


def test_the_gate_calls_the_scaled_features_and_blames_the_strategy() -> None:
    kept, failures = gate_envs([_town_env(TOWN_CODE)], {"town": "train"}, 10.0)
    assert failures == [] and len(kept) == 1
    scalar_only = TOWN_CODE.replace("    if isinstance(k, list):\n        return {'towns': [one(item) for item in k]}\n", "")
    kept, [failure] = gate_envs([_town_env(scalar_only)], {"town": "train"}, 10.0)
    assert kept == [] and (failure.reason, failure.strategies) == ("scaled_feature_fails",
                                                                   ["parameter_type_generalization"])
    assert failure.detail.startswith("k as array: get_town({\"k\": [\"alpha\"]}) fails: ")
    wrong_list = TOWN_CODE.replace("[one(item) for item in k]", "[one('beta') for item in k]")
    kept, [failure] = gate_envs([_town_env(wrong_list)], {"town": "train"}, 10.0)
    assert (failure.reason, failure.strategies) == ("scaled_feature_fails", ["parameter_type_generalization"])
    assert "loses the sub-answer 'Kiruna'" in failure.detail


def test_prompts_can_be_overridden_and_bad_placeholders_are_named(tmp_path: Path) -> None:
    (tmp_path / "decompose.txt").write_text(
        "FTRL environment builder - stage: decompose\nQ: $question $hints"
    )
    prompts = load_prompts(str(tmp_path))
    assert prompts["decompose"].source == str(tmp_path / "decompose.txt")
    assert prompts["document"].source == str(PROMPT_DIR / "document.txt")
    assert (
        prompts["decompose"].render(question="Why?", hints="")
        == "FTRL environment builder - stage: decompose\nQ: Why? "
    )
    (tmp_path / "bad.txt").write_text("$question and $answer")
    with pytest.raises(ValueError, match=r"prompt 'decompose' \(.*bad.txt\) uses \['\$answer'\]"):
        load_prompts(overrides={"decompose": str(tmp_path / "bad.txt")})
    with pytest.raises(ValueError, match="unknown stage"):
        load_prompts(overrides={"decomp": str(tmp_path / "bad.txt")})


def test_topics_generate_seed_tasks_per_scenario(tmp_path: Path) -> None:
    fixtures = load_fixtures() + [
        {
            "stage": "seed",
            "match": '"weather"',
            "replies": [
                {
                    "questions": [
                        {"question": "What is the weather in Paris today?", "scenario": "Single-Hop"},
                        {
                            "question": "What is the population of the capital of France?",
                            "scenario": "Multi-Hop",
                        },
                    ]
                }
            ],
        }
    ]
    with BuilderServer(fixtures) as server:
        cfg = _config(
            server,
            seed_file=None,
            topics=["weather"],
            tasks_per_topic=2,
            test_fraction=0.0,
            scenario_weights={"single_hop": 1.0, "multi_hop": 1.0},
            # Topic seeds get ids hashed from their question; seed 201 draws for them the strategies seed 0
            # draws for t1 and t2, which the recorded scale replies were written for.
            seed=201,
        )
        result = build_env_set(cfg, sets_dir=tmp_path)
    assert "1. Single-Hop\n2. Multi-Hop" in server.requests[0]["messages"][1]["content"]
    assert _questions(result.records["train"]) == KEPT["train"]
    assert "Scenario type to build: Multi-Hop" in next(
        body["messages"][1]["content"]
        for body in server.requests
        if "capital of France" in body["messages"][1]["content"]
    )
    assert result.report.stages[0].stage == "topics" and (
        result.report.stages[0].entered,
        result.report.stages[0].passed,
    ) == (1, 1)


@pytest.mark.parametrize("experiment,model,prices", [
    ("qwen3_8b_grpo", "gpt-4o", (2.5, 10.0)),  # the paper's builder model in every paper experiment ...
    ("freeze_ablation", "gpt-4o", (2.5, 10.0)),
    ("eval_qwen25_7b", "gpt-4o", (2.5, 10.0)),
    ("tiny_freeze_ablation", "gpt-4o-mini", (0.15, 0.6)),  # ... while the CPU ones keep the envs=llm defaults
    ("eval_tiny", "gpt-4o-mini", (0.15, 0.6)),
])
def test_paper_experiments_default_the_builder_to_gpt4o(experiment: str, model: str, prices: tuple,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from hydra import compose, initialize_config_dir

    import ftrl.run  # noqa: F401  (registers the config resolvers)
    from ftrl.config import load_run_config

    monkeypatch.setenv("FTRL_DATA_DIR", "/datasets")
    conf = Path(__file__).resolve().parent.parent / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = load_run_config(compose(config_name="config", overrides=[
            "run_dir=/tmp/ftrl-test-run", f"+experiment={experiment}", "envs=llm"]))
    assert cfg.envs.name == "llm" and cfg.envs.llm.model == model
    assert (cfg.envs.llm.api.price_per_mtok_in, cfg.envs.llm.api.price_per_mtok_out) == prices
    assert cfg.envs.llm.functional_generalization == SCALING.functional_generalization


def test_config_errors_name_the_key() -> None:
    for key, value, message in (
        ("parameter_expansion", 1.5, "envs.llm.parameter_expansion"),
        ("min_distractors", 3, "envs.llm.min_distractors/max_distractors"),
        ("dedup_threshold", 0.0, "envs.llm.dedup_threshold"),
        ("scenario_weights", {"two_hop": 1.0}, "envs.llm.scenario_weights"),
    ):
        run_config = RunConfig()
        setattr(run_config.envs.llm, key, value)
        with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
            run_config.validate()
    with BuilderServer() as server:
        cfg = _config(server, seed_file=None)
        with pytest.raises(ValueError, match="no seed tasks; set envs.llm.seed_file"):
            build_env_set(cfg, sets_dir="/nonexistent")
