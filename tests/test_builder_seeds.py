"""Grounded seeds: QA datasets with gold answers as the LLM builder's seed tasks (``envs.llm.seed_source``).

A local JSONL adapter and a ``datasets`` adapter (here on local files written to tmp: Parquet, JSON
lines, a ``save_to_disk`` directory), configurable and dotted field names, rows without a question or
answer reported; a gold answer becomes the environment's final answer verbatim (the decompose stage
must reproduce it, the gate checks it), and the decompose prompt only tells the LLM to choose answers
where no gold answer exists. Builds run against the recorded stub LLM (tests/builder_stub.py).

    OMP_NUM_THREADS=1 python -m pytest tests/test_builder_seeds.py -q
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from builder_stub import FIXTURES, BuilderServer

from ftrl.builder import build_env_set
from ftrl.builder.gate import gate_envs
from ftrl.builder.records import Deployed, GoldCall, Scenario, SeedTask, SubQuestion, ToolSet
from ftrl.builder.seeds import field_value, read_seed_source
from ftrl.config import ConfigError, LLMBuildConfig, RunConfig, SeedSourceConfig

QA = FIXTURES / "qa_gold.jsonl"
FIELDS = {"question_field": "query", "answer_field": "answers.text", "id_field": "qid"}


def _rows() -> list[dict[str, Any]]:
    return [json.loads(line) for line in QA.read_text(encoding="utf-8").splitlines()]


def _parquet(tmp_path: Path) -> Path:
    path = tmp_path / "qa.parquet"
    pq.write_table(pa.Table.from_pylist(_rows()), path)
    return path


def _summary(tasks: list[SeedTask]) -> list[tuple[str, str, str | None]]:
    return [(task.task_id, task.question, task.reference_answer) for task in tasks]


EXPECTED = [
    ("t2_capital_population", "What is the population of the capital of France?", "2,102,650"),
    ("t3_two_cities", "How many people live in Oslo and in Lima?", "709037, 10092000"),
    ("t1_weather", "What is the weather in Paris today?", "cloudy"),
]


# ------------------------------------------------------------------------------------ adapters
def test_the_jsonl_adapter_reads_configured_fields_and_reports_rows_without_answers() -> None:
    tasks, failures = read_seed_source(SeedSourceConfig(kind="jsonl", path=str(QA), **FIELDS))
    assert _summary(tasks) == EXPECTED
    assert tasks[0].origin == f"jsonl:{QA}:1"
    assert [(f.task_id, f.stage, f.reason, f.detail) for f in failures] == [
        ("q4_unanswered", "seeds", "missing_gold_answer", f"{QA}:4: 'answers.text' is empty")
    ]


@pytest.mark.parametrize("form", ["parquet", "jsonl", "save_to_disk"])
def test_the_datasets_adapter_reads_local_files_and_directories(tmp_path: Path, form: str) -> None:
    import datasets

    if form == "parquet":
        path, split = _parquet(tmp_path), "train"
    elif form == "jsonl":
        path, split = QA, "validation"  # a single data file is read as the split asked for
    else:
        path, split = tmp_path / "stored", "test"
        table = datasets.Dataset.from_list(_rows())
        datasets.DatasetDict({"train": table.select([0]), "test": table}).save_to_disk(str(path))
    tasks, failures = read_seed_source(SeedSourceConfig(kind="datasets", path=str(path), split=split, **FIELDS))
    assert _summary(tasks) == EXPECTED
    assert [(f.task_id, f.reason) for f in failures] == [("q4_unanswered", "missing_gold_answer")]
    assert tasks[0].origin == f"datasets:{path}[{split}] row 0"


def test_adapter_errors_name_the_key_the_row_and_the_choices(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"qa_gold.jsonl:1: no field 'question' \(envs\.llm\.seed_source\."
                                         r"question_field\); the row has \['answers', 'qid', 'query'\]"):
        read_seed_source(SeedSourceConfig(kind="jsonl", path=str(QA), answer_field="answers.text"))
    with pytest.raises(ValueError, match=r"envs\.llm\.seed_source\.answer_field='answers' is an object with fields "
                                         r"\['text'\]; name one inside it, e\.g\. envs\.llm\.seed_source\.answer_field="
                                         r"answers\.text"):
        read_seed_source(SeedSourceConfig(kind="jsonl", path=str(QA), question_field="query", answer_field="answers"))
    stored = tmp_path / "stored"
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(_rows())}).save_to_disk(str(stored))
    with pytest.raises(ValueError, match=r"envs\.llm\.seed_source\.path=.*\(split 'dev'\): datasets could not read "
                                         r"it: .*no split 'dev'; splits: \['train'\]"):
        read_seed_source(SeedSourceConfig(kind="datasets", path=str(stored), split="dev", **FIELDS))
    with pytest.raises(FileNotFoundError, match=r"envs\.llm\.seed_source\.path: no such file or directory"):
        read_seed_source(SeedSourceConfig(kind="datasets", path=str(tmp_path / "missing.parquet"), **FIELDS))
    (tmp_path / "qa.txt").write_text("q")
    with pytest.raises(ValueError, match=r"cannot read 'qa\.txt'; data files datasets reads: \['\.arrow', '\.csv', "
                                         r"'\.json', '\.jsonl', '\.parquet'\]"):
        read_seed_source(SeedSourceConfig(kind="datasets", path=str(tmp_path / "qa.txt"), **FIELDS))
    repeated = tmp_path / "repeated.jsonl"
    repeated.write_text('{"id": "a", "question": "Q1?", "answer": "1"}\n{"id": "a", "question": "Q2?", "answer": "2"}\n')
    with pytest.raises(ValueError, match=r"repeated\.jsonl:2: id 'a' \(envs\.llm\.seed_source\.id_field='id'\) is "
                                         r"repeated"):
        read_seed_source(SeedSourceConfig(kind="jsonl", path=str(repeated)))


def test_dotted_fields_walk_nested_rows_and_lists() -> None:
    row = {"answers": {"text": ["Paris", "paris"]}, "meta": [{"id": 7}], "n": 2.0}
    assert field_value(row, "answers.text") == "Paris"
    assert field_value(row, "meta.id") == 7
    assert field_value(row, "n") == 2.0
    assert field_value(row, "answers.start") is not None and field_value(row, "answers.start") is field_value(
        row, "nothing")  # the same "missing" marker


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"kind": "csv", "path": "qa.csv"}, (r"envs.llm.seed_source.kind: unknown value 'csv'; valid: \['datasets', "
                                           r"'jsonl'\]")),
        ({"kind": "jsonl"}, "envs.llm.seed_source.path: required with envs.llm.seed_source.kind=jsonl"),
        ({"path": "qa.jsonl"}, (r"envs.llm.seed_source.kind: null, but envs.llm.seed_source.path is set; set kind to "
                               r"one of \['jsonl', 'datasets'\]")),
        ({"kind": "jsonl", "path": "qa.jsonl", "answer_field": " "}, ("envs.llm.seed_source.answer_field: must be a "
                                                                     "non-empty field name")),
        ({"kind": "jsonl", "path": "qa.jsonl", "answer_field": "question"},
         "envs.llm.seed_source.question_field/answer_field: both are 'question'"),
    ],
)
def test_seed_source_config_errors_name_the_key_and_the_choices(changes: dict[str, Any], message: str) -> None:
    run_config = RunConfig()
    for key, value in changes.items():
        setattr(run_config.envs.llm.seed_source, key, value)
    with pytest.raises(ConfigError, match=message):
        run_config.validate()


# ------------------------------------------------------------------------------------ grounded builds
def _config(server: BuilderServer, source: SeedSourceConfig) -> LLMBuildConfig:
    cfg = LLMBuildConfig(model="stub-builder", seed_source=source, backoff_base_s=0.0, test_fraction=0.0)
    cfg.api.base_url, cfg.api.api_key_env, cfg.api.max_retries = server.base_url, "", 1
    return cfg


@pytest.mark.parametrize("kind", ["jsonl", "datasets"])
def test_gold_answers_become_the_final_answers_of_the_environments(tmp_path: Path, kind: str) -> None:
    path = QA if kind == "jsonl" else _parquet(tmp_path)
    source = SeedSourceConfig(kind=kind, path=str(path), **FIELDS)
    with BuilderServer() as server:
        result = build_env_set(_config(server, source), sets_dir=tmp_path / "sets")
        prompts = {body["messages"][1]["content"].split("Question: ")[1].split("\n")[0]: body["messages"][1]["content"]
                   for body in server.requests if "stage: decompose" in body["messages"][1]["content"]}
    records = {r["messages"][0]["content"]: r for r in result.records["train"]}
    # The gold answer verbatim (not the LLM's "2102650"), reached by the tools' outputs (the shared gate).
    assert {q: r["answer"] for q, r in records.items()} == {EXPECTED[0][1]: "2,102,650",
                                                            EXPECTED[1][1]: "709037, 10092000"}
    report = result.env_set.report()
    flow = {s["stage"]: (s["entered"], s["passed"], s["failed"]) for s in report["stages"]}
    assert flow["seeds"] == (4, 3, {"missing_gold_answer": 1})
    assert flow["decompose"] == (3, 2, {"schema_violation": 1})
    [weather] = [f for f in report["failures"] if f["task_id"] == "t1_weather"]
    assert "$.final_answer is 'sunny' but the gold answer is 'cloudy'" in weather["detail"]
    assert {row["task_id"]: row["gold_answer"] for row in report["envs"]} == {
        "t2_capital_population": "2,102,650", "t3_two_cities": "709037, 10092000"}
    # Grounded prompts state the gold answer and never ask the LLM to choose answers.
    grounded = prompts[EXPECTED[0][1]]
    assert 'The gold answer to the question is known: "2,102,650"' in grounded
    assert "plausible" not in grounded and "invent" not in grounded.replace("do not invent", "")
    assert result.env_set.manifest["seeds"]["seed_source"]["answer_field"] == "answers.text"


def test_questions_without_gold_answers_are_told_to_use_true_facts(tmp_path: Path) -> None:
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text(json.dumps({"id": "t2_capital_population", "question": EXPECTED[0][1]}) + "\n")
    with BuilderServer() as server:
        cfg = _config(server, SeedSourceConfig())
        cfg.seed_file = str(seeds)
        build_env_set(cfg, sets_dir=tmp_path / "sets", write=False)
        [prompt] = [body["messages"][1]["content"] for body in server.requests
                    if "stage: decompose" in body["messages"][1]["content"]][:1]
    assert "Use true facts where they are known." in prompt and "gold answer" not in prompt


def test_the_gate_refuses_an_env_whose_final_answer_is_not_the_gold_answer() -> None:
    tool = {"type": "function", "function": {"name": "get_town", "description": "The town of a code.",
                                             "parameters": {"type": "object",
                                                            "properties": {"code": {"type": "string"}},
                                                            "required": ["code"]}}}
    code = ("def get_town(code):\n    table = {'alpha': 'Kiruna'}\n    key = str(code).strip().lower()\n"
            "    if key not in table:\n        raise ValueError(f'unknown code {code!r}')\n"
            "    return {'code': key, 'town': table[key]}\n")
    for gold, reason in (("Kiruna", None), ("Lund", "gold_answer_mismatch")):
        task = SeedTask("town", "Which town has code alpha?", "test", reference_answer=gold)
        scenario = Scenario(task, "Single-Hop", [SubQuestion("q1", "Town of alpha?", "Kiruna")], "Kiruna")
        toolset = ToolSet(scenario, [tool], [GoldCall("q1", "get_town", {"code": "alpha"})])
        kept, failures = gate_envs([Deployed(toolset, {"get_town": code})], {"town": "train"}, 10.0)
        assert [f.reason for f in failures] == ([] if reason is None else [reason])
        assert len(kept) == (1 if reason is None else 0)
    assert failures[0].detail == "the environment's final answer 'Kiruna' is not the gold answer 'Lund'"
