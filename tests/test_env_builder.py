"""The LLM environment builder end to end against a local OpenAI-compatible server (real HTTP).

The server (tests/builder_stub.py) answers every stage from recorded replies
(tests/fixtures/env_builder/replies.json) for seven seed tasks (fixtures/env_builder/seeds.jsonl):

====  ====================  ==============================================  ===============================
task  scenario              what the recorded replies do                    expected
====  ====================  ==============================================  ===============================
t1    Single-Hop            decomposition fenced, with a trailing comma     kept (repaired locally)
t2    Multi-Hop             first decomposition is prose (no JSON)          kept (after a repair request)
t3    Parallel Single-Hop   two per-city tools merged into one (2 -> 1)     kept (test split)
t4    Single-Hop            the deployed tool raises on its gold call       gate: gold_call_error
t5    -                     near-duplicate of t1                            dedup: duplicate_question
t6    Single-Hop            decomposition invalid three times               decompose: schema_violation
t7    Single-Hop            the distractor tool returns the answer          gate: distractor_returns_answer
====  ====================  ==============================================  ===============================

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
from ftrl.builder.llm import LazyEngine, Ledger, LLMCache, StageError, StructuredLLM
from ftrl.builder.prompts import PROMPT_DIR, load_prompts
from ftrl.builder.records import GoldCall, Scenario, SeedTask, SubQuestion, ToolSet
from ftrl.builder.schema import check_tool_schema, classify_structure, parse_llm_json, validate
from ftrl.builder.stages import Knobs, StageContext, check_source, scale
from ftrl.config import ConfigError, LLMBuildConfig, ProceduralConfig, RunConfig
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
REQUESTS_FIRST_BUILD = 26  # t1 4, t2 6 (one repair), t3 5, t4 4, t6 3 (two repairs), t7 4; t5 none


def _config(server: BuilderServer, **overrides: Any) -> LLMBuildConfig:
    settings = {
        "model": "stub-builder",
        "seed_file": str(SEEDS),
        "min_distractors": 1,
        "max_distractors": 1,
        "backoff_base_s": 0.0,
        # The recorded stub replies were written for these knobs (no scaling, four tasks a topic),
        # not for the builder's defaults (scaling 0.3, eight tasks a topic).
        "functional_generalization": 0.0,
        "parameter_expansion": 0.0,
        "parameter_type_generalization": 0.0,
        "tasks_per_topic": 4,
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
    return {"records": records, "sets_dir": sets_dir, "stages": stages, "run_config": run_config}


# ------------------------------------------------------------------------------------ acceptance
def test_the_pipeline_keeps_exactly_the_good_envs_and_reports_why(built) -> None:
    records = built["records"]
    assert {split: _questions(rows) for split, rows in records.items()} == KEPT
    assert len(built["stages"]) == REQUESTS_FIRST_BUILD
    env_set = resolve_set(records.manifest["set"], built["sets_dir"])
    report = env_set.report()
    flow = {s["stage"]: (s["entered"], s["passed"], s["failed"]) for s in report["stages"]}
    assert flow == {
        "dedup": (7, 6, {"duplicate_question": 1}),
        "decompose": (6, 5, {"schema_violation": 1}),
        "document": (5, 5, {}),
        "integrate": (5, 5, {}),
        "scale": (5, 5, {}),
        "deploy": (5, 5, {}),
        "gate": (5, 3, {"distractor_returns_answer": 1, "gold_call_error": 1}),
    }
    why = {f["task_id"]: (f["stage"], f["reason"], f["detail"]) for f in report["failures"]}
    assert set(why) == {"t4_director", "t5_weather_again", "t6_tower", "t7_currency"}
    assert why["t4_director"][:2] == ("gate", "gold_call_error")
    assert "an error occured when call get_movie_director: 'Inception'" in why["t4_director"][2]
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
    usage = report["usage"]["this_run"]
    assert (usage["requests"], usage["cache_hits"], usage["repairs"], usage["local_repairs"]) == (26, 0, 3, 1)
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (260, 130)  # 10 + 5 tokens per stub reply
    assert usage["cost_usd"] == pytest.approx((260 * 1.0 + 130 * 2.0) / 1e6)


def test_records_are_reference_records_with_gold_calls(built) -> None:
    train, test = built["records"]["train"], built["records"]["test"]
    for index, record in enumerate(train + test):
        validate_record(record, f"llm #{index}")
        assert list(record) == list(REFERENCE_FIELDS) + ["gold_calls"]
    weather, capital = train
    assert (weather["data_source"], weather["answer"]) == ("Single-Hop", "sunny")
    assert [t["function"]["name"] for t in json.loads(weather["tools"])] == ["get_weather", "get_air_quality"]
    assert json.loads(weather["unsolved_set"]) == {"get_weather": ["sunny"]}
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
    assert manifest["knobs"]["min_distractors"] == 1 and manifest["counts"]["test"] == {
        "Parallel Single-Hop": 1
    }
    assert manifest["statistics"]["train"]["Multi-Hop"] == {
        "count": 1.0,
        "mean_sub_answers": 2.0,
        "mean_tools": 3.0,
        "mean_distractors": 1.0,
        "mean_gold_turns": 2.0,
        "mean_gold_calls": 2.0,
    }
    assert manifest["usage"]["total"]["total_prompt_tokens"] == 260
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
        again.report.usage["this_run"]["requests"] == 0 and again.report.usage["this_run"]["cache_hits"] == 26
    )
    assert again.report.usage["total"]["total_prompt_tokens"] == 260  # what the set cost when it was built
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
                "min_distractors=1",
                "backoff_base_s=0",
                "max_distractors=1",
                "functional_generalization=0",
                "parameter_expansion=0",
                "parameter_type_generalization=0",
                "--sets-dir",
                str(tmp_path),
            ]
        )
        assert code == 0
        assert server.stages == ["document", "integrate", "scale", "deploy"]
    assert "kept train=2, test=1" in capsys.readouterr().out
    assert {s.ref for s in list_sets(tmp_path)} == {first.env_set.ref, resolve_set("llm", tmp_path).ref}


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
    assert "tools (1 answering, 1 distractor):" in text and "get_city_mayor(city: string)" in text
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
    assert Knobs().draw("t") == ([], 0)
    assert Knobs(1.0, 1.0, 1.0, 2, 2).draw("t") == (
        ["functional_generalization", "parameter_expansion", "parameter_type_generalization", "distractors"],
        2,
    )
    half = Knobs(parameter_expansion=0.5, seed=1)
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
    ctx = StageContext(llm, load_prompts(), Knobs(parameter_expansion=1.0), concurrency=1)
    outputs, failures = scale([ToolSet(scenario, [tool], [GoldCall("q1", "get_x", {"k": "A"})])], ctx)
    assert outputs == [] and [(f.stage, f.reason) for f in failures] == [("scale", "schema_violation")]
    assert "parameter expansion was asked for" in failures[0].detail
    assert "Parameter expansion: add parameters" in engine.sent[0][1]["content"]


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
