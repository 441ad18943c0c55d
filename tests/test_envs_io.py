"""Reference-format record I/O: round trips, validation errors with file:line, loading, hashing, export.

    python -m pytest tests/test_envs_io.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ftrl.config import FilesConfig
from ftrl.envs.io import (
    RecordError,
    env_set_hash,
    load_ftrl_files,
    read_records,
    reference_record,
    tool_schema_problems,
    validate_record,
    write_jsonl,
    write_parquet,
)

CODE = "def get_order_total(order_id):\n    return {'order_id': order_id, 'total': 624}\n"
TOOL = {"type": "function", "function": {
    "name": "get_order_total", "description": "Get the total of an order.",
    "parameters": {"type": "object", "properties": {"order_id": {"type": "integer"}}, "required": ["order_id"]}}}


def make_record(**overrides) -> dict:
    record = {
        "messages": [{"role": "user", "content": "What is the total of order 8514?"}],
        "tools": json.dumps([TOOL]),
        "codes": json.dumps({"get_order_total": CODE}),
        "unsolved_set": json.dumps({"get_order_total": ["624"]}),
        "solve_rate": 0.0,
        "answer": "624",
        "data_source": "Single-Hop",
        "split": "train",
        "gold_calls": json.dumps([[{"name": "get_order_total", "arguments": {"order_id": 8514}}]]),
    }
    record.update(overrides)
    return record


def snapshot_records() -> list[dict]:
    """Snapshots as collection writes them: assistant turns with and without tool calls."""
    call = {"id": "call_0", "type": "function",
            "function": {"name": "get_order_total", "arguments": '{"order_id": 8514}'}}
    with_call = make_record(messages=[
        {"role": "user", "content": "What is the total of order 8514?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": '{"order_id": 8514, "total": 624}', "tool_call_id": "call_0"},
        {"role": "assistant", "content": "The total is 624."},
    ], solve_rate=1.0, unsolved_set="{}")
    without_call = make_record(messages=[
        {"role": "user", "content": "Ünïcode question: total of order 1234?"},
        {"role": "assistant", "content": "I do not know.", "tool_calls": None},
    ], extra_info={"index": 7, "tag": "x"})
    return [with_call, without_call]


# ------------------------------------------------------------------------------------- JSON lines
def test_jsonl_round_trip_keeps_every_field_and_leaves_no_temp_file(tmp_path: Path) -> None:
    records = snapshot_records()
    path = tmp_path / "sub" / "snapshots.jsonl"
    write_jsonl(path, records)
    assert read_records(path) == records
    assert sorted(p.name for p in path.parent.iterdir()) == ["snapshots.jsonl"]
    write_jsonl(path, records[:1])  # rewriting replaces the whole file
    assert read_records(path) == records[:1]


def test_a_record_that_is_not_json_fails_naming_it_and_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "envs.jsonl"
    write_jsonl(path, [make_record()])
    with pytest.raises(RecordError, match=r"envs.jsonl: record 1 cannot be written as JSON: .*set"):
        write_jsonl(path, [make_record(), make_record(answer={1, 2})])
    assert read_records(path) == [make_record()]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["envs.jsonl"]


def test_a_crash_truncated_last_line_is_reported_or_dropped(tmp_path: Path) -> None:
    path = tmp_path / "snapshots.jsonl"
    write_jsonl(path, [make_record(answer="1")])
    with open(path, "a", encoding="utf-8") as handle:
        handle.write('{"messages": [{"role": "us')  # a crash mid-record
    with pytest.raises(RecordError, match=r"snapshots.jsonl:2: line is not valid JSON"):
        read_records(path)
    assert [r["answer"] for r in read_records(path, drop_partial_last_line=True)] == ["1"]


def test_read_records_reports_bad_lines_and_file_types(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(make_record()) + "\n\n[1, 2]\n", encoding="utf-8")
    with pytest.raises(RecordError, match=r"bad.jsonl:3: expected a JSON object, got list"):
        read_records(path)
    csv = tmp_path / "x.csv"
    csv.write_text("a,b\n", encoding="utf-8")
    with pytest.raises(RecordError, match=r"unsupported record file type '.csv'; valid: \['.jsonl', '.parquet'\]"):
        read_records(csv)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        read_records(tmp_path / "missing.jsonl")


# ---------------------------------------------------------------------------------------- Parquet
def test_parquet_round_trip_with_mixed_tool_calls_and_content(tmp_path: Path) -> None:
    records = snapshot_records()
    path = write_parquet(tmp_path / "snapshots.parquet", records)
    back = read_records(path)
    # `tool_calls: None` reads back as an absent key (Parquet structs pad missing keys with None).
    expected = json.loads(json.dumps(records))
    del expected[1]["messages"][1]["tool_calls"]
    del expected[1]["extra_info"]  # a field one record lacks is no column (never null on some rows)
    assert back == expected
    assert back[0]["messages"][1]["content"] is None
    assert back[0]["messages"][1]["tool_calls"][0]["function"]["arguments"] == '{"order_id": 8514}'
    assert isinstance(back[0]["solve_rate"], float) and back[0]["solve_rate"] == 1.0
    both = [dict(record, extra_info={"index": i, "tag": "x"}) for i, record in enumerate(records)]
    assert [r["extra_info"]["index"] for r in read_records(write_parquet(tmp_path / "both.parquet", both))] == [0, 1]


def test_parquet_columns_are_present_for_all_rows_or_for_none(tmp_path: Path, caplog) -> None:
    import pyarrow.parquet as pq

    # Snapshots: the first of an episode is the environment record (with gold_calls), later ones are not.
    first = make_record()
    later = {k: v for k, v in make_record(solve_rate=1.0, unsolved_set="{}").items() if k != "gold_calls"}
    with caplog.at_level("INFO", logger="ftrl.envs.io"):
        path = write_parquet(tmp_path / "snapshots.parquet", [first, later, later])
    assert pq.read_schema(path).names == list(later)
    assert "left out of the Parquet copy: gold_calls (1 of 3)" in caplog.text
    for index, record in enumerate(read_records(path)):
        validate_record(record, f"row {index}")  # a null gold_calls column would fail here
    with pytest.raises(RecordError, match=r"s.parquet: record 1 lacks reference field 'answer', which 1 of 2"):
        write_parquet(tmp_path / "s.parquet", [make_record(), {k: v for k, v in later.items() if k != "answer"}])


def test_parquet_stores_dict_arguments_as_json_strings(tmp_path: Path) -> None:
    first, second = snapshot_records()
    first["messages"][1]["tool_calls"][0]["function"]["arguments"] = {"order_id": 8514}
    second["messages"][1] = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": {"product_id": "P73"}}}]}
    back = read_records(write_parquet(tmp_path / "s.parquet", [first, second]))
    assert back[0]["messages"][1]["tool_calls"][0]["function"]["arguments"] == '{"order_id": 8514}'
    assert back[1]["messages"][1]["tool_calls"][0]["function"]["arguments"] == '{"product_id": "P73"}'


def test_parquet_rejects_a_field_whose_type_varies(tmp_path: Path) -> None:
    with pytest.raises(RecordError, match=r"field 'answer' cannot be stored as one Parquet column"):
        write_parquet(tmp_path / "s.parquet", [make_record(answer="624"), make_record(answer=["624"])])
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------- validation
def test_a_good_record_validates() -> None:
    validate_record(make_record(), "train.jsonl:1")
    # Already-decoded fields are accepted too.
    validate_record(make_record(tools=[TOOL], codes={"get_order_total": CODE}, unsolved_set={}), "x:1")


@pytest.mark.parametrize(("change", "message"), [
    (lambda r: r.pop("answer"), "train.jsonl:17: missing field 'answer'"),
    (lambda r: r.update(codes="{not json"), "train.jsonl:17: field 'codes' is not valid JSON: "),
    (lambda r: r.update(tools='{"a": 1}'), "train.jsonl:17: field 'tools' must be a JSON list"),
    (lambda r: r.update(unsolved_set='{"foo": ["1"]}'),
     "train.jsonl:17: unsolved_set key 'foo' is not a tool in tools/codes"),
    (lambda r: r.update(codes="{}"), "unsolved_set key 'get_order_total' is not a tool in tools/codes"),
    (lambda r: r.update(tools=json.dumps([{"type": "function", "function": {"description": "x"}}])),
     "train.jsonl:17: tools[0] is not an OpenAI function schema"),
    (lambda r: r.update(split="dev"), "train.jsonl:17: field 'split' is 'dev'; valid: ['train', 'test']"),
    (lambda r: r.update(messages=[]), "train.jsonl:17: field 'messages' must be a non-empty list"),
    (lambda r: r.update(messages=[{"role": "user"}]), "messages[0] must be an object with 'role' and 'content'"),
    (lambda r: r.update(messages=[{"role": "bot", "content": "x"}]), "messages[0].role 'bot' is not one of"),
    (lambda r: r.update(solve_rate="0"), "field 'solve_rate' must be a number"),
    (lambda r: r.update(gold_calls='[[{"name": "nope", "arguments": {}}]]'),
     "gold_calls[0] calls 'nope', which is not a tool"),
])
def test_validation_errors_name_the_place_and_the_field(change, message: str) -> None:
    record = make_record()
    change(record)
    with pytest.raises(RecordError) as error:
        validate_record(record, "train.jsonl:17")
    assert message in str(error.value)


# ---------------------------------------------------------------------------------------- loading
def test_load_ftrl_files_reads_both_splits_and_keeps_extra_fields(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", [make_record(), make_record(answer="7", custom="kept")])
    write_parquet(tmp_path / "test.parquet", [make_record(split="test")])
    loaded = load_ftrl_files(FilesConfig(train=str(tmp_path / "train.jsonl"), test=str(tmp_path / "test.parquet")))
    assert [len(loaded["train"]), len(loaded["test"])] == [2, 1]
    assert loaded["train"][1]["custom"] == "kept"
    assert loaded["test"][0]["split"] == "test"

    only_test = load_ftrl_files(FilesConfig(test=str(tmp_path / "test.parquet")))
    assert only_test["train"] == [] and len(only_test["test"]) == 1


def test_load_ftrl_files_errors_name_the_key_the_file_and_the_line(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"envs.files.train / envs.files.test: both unset"):
        load_ftrl_files(FilesConfig())
    missing = tmp_path / "nope" / "train.jsonl"
    with pytest.raises(FileNotFoundError, match=rf"envs.files.train: no such file '{missing}'"):
        load_ftrl_files(FilesConfig(train=str(missing)))

    bad = make_record()
    bad["unsolved_set"] = json.dumps({"foo": ["1"]})
    write_jsonl(tmp_path / "test.jsonl", [make_record(split="test"), bad])
    with pytest.raises(RecordError, match=r"test.jsonl:2: unsolved_set key 'foo' is not a tool in tools/codes"):
        load_ftrl_files(FilesConfig(test=str(tmp_path / "test.jsonl")))


# ---------------------------------------------------------------------------------------- hashing
def test_env_set_hash_is_a_content_hash(tmp_path: Path) -> None:
    records = snapshot_records()
    base = env_set_hash({"train": records, "test": []})
    assert len(base) == 16 and base == env_set_hash({"train": records, "test": []})
    # The same content from Parquet, or with other JSON whitespace, hashes the same.
    assert env_set_hash({"train": read_records(write_parquet(tmp_path / "s.parquet", records[:1])),
                         "test": []}) == env_set_hash({"train": records[:1], "test": []})
    respaced = [dict(r, tools=json.dumps(json.loads(r["tools"]), indent=2)) for r in records]
    assert env_set_hash({"train": respaced, "test": []}) == base
    changed = [dict(records[0], answer="625"), records[1]]
    assert env_set_hash({"train": changed, "test": []}) != base
    assert env_set_hash({"train": [], "test": records}) != base


# ------------------------------------------------------------------------------ OpenAI schemas, export
def _function(parameters: dict, name: str = "f") -> dict:
    return {"type": "function", "function": {"name": name, "description": "d", "parameters": parameters}}


@pytest.mark.parametrize(("parameters", "problem"), [
    ({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["b"]},
     "parameters.required: 'b' is not in properties"),
    ({"type": "object", "properties": {"ids": {"type": ["string", "array"]}}, "required": []},
     "parameters.properties.ids: an array needs 'items'"),
    ({"type": "object", "properties": {"a": {"type": "array", "items": {"type": "array"}}}},
     "parameters.properties.a.items: an array needs 'items'"),
    ({"type": "object", "properties": {"a": {"type": "text"}}}, "parameters.properties.a: unknown type 'text'"),
    ({"type": "object", "properties": {"a": {"description": "no type"}}}, "'type' must be a JSON type"),
    ({"type": "object", "properties": {"a": {"type": "string", "enum": []}}}, "'enum' must be a non-empty list"),
    ({"type": "array"}, "parameters must be a JSON schema of type 'object'"),
    ({"type": "object"}, "parameters.properties must be an object"),
])
def test_tool_schema_problems_name_the_parameter(parameters: dict, problem: str) -> None:
    problems = tool_schema_problems(_function(parameters))
    assert len(problems) == 1 and problem in problems[0] and problems[0].startswith("function 'f': ")


def test_tool_schema_problems_accept_valid_schemas() -> None:
    assert tool_schema_problems(TOOL) == []
    assert tool_schema_problems(_function({"type": "object", "properties": {
        "ids": {"type": ["integer", "string", "array"], "items": {"type": ["integer", "string"]}},
        "where": {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]},
        "either": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}},
        "required": ["ids"]})) == []
    assert tool_schema_problems(_function({"type": "object", "properties": {}}, name="bad name"))[0].endswith(
        "name must be 1-64 letters, digits, '_' or '-'")


def test_every_procedural_schema_is_valid_for_openai_tool_calling() -> None:
    from ftrl.config import ProceduralConfig
    from ftrl.envs.procedural import generate_envs

    knobs = {"functional_generalization": 0.5, "parameter_expansion": 0.5, "parameter_type_generalization": 0.5}
    records = generate_envs(ProceduralConfig(num_train=60, num_test=0, **knobs), seed=4).records["train"]
    tools = [tool for record in records for tool in json.loads(record["tools"])]
    assert any("array" in next(iter(t["function"]["parameters"]["properties"].values()))["type"] for t in tools)
    assert {tool["function"]["name"]: tool_schema_problems(tool) for tool in tools if tool_schema_problems(tool)} == {}


def test_export_writes_exactly_the_reference_fields(tmp_path: Path, capsys) -> None:
    from ftrl.envs.sets import export_records, main, write_set
    from ftrl.types import REFERENCE_FIELDS

    write_set({"train": [make_record(), make_record(answer="7")], "test": [make_record(split="test")]},
              name="tiny", sets_dir=tmp_path / "sets")
    assert main(["--sets-dir", str(tmp_path / "sets"), "export", "tiny", "--out", str(tmp_path / "ref")]) == 0
    assert "wrote 2 train records (reference) to" in capsys.readouterr().out
    train = read_records(tmp_path / "ref" / "train.jsonl")
    assert [list(record) for record in train] == [list(REFERENCE_FIELDS)] * 2
    assert train[0] == reference_record(make_record()) and "gold_calls" not in train[0]
    assert main(["--sets-dir", str(tmp_path / "sets"), "export", "tiny", "--out", str(tmp_path / "pq"),
                 "--type", "parquet"]) == 0
    assert [list(r) for r in read_records(tmp_path / "pq" / "test.parquet")] == [list(REFERENCE_FIELDS)]
    assert main(["--sets-dir", str(tmp_path / "sets"), "export", "tiny", "--out", str(tmp_path / "all"),
                 "--format", "internal"]) == 0
    assert read_records(tmp_path / "all" / "train.jsonl")[0] == make_record()

    no_items = make_record(tools=json.dumps([_function({"type": "object", "properties": {
        "order_id": {"type": "array"}}}, name="get_order_total")]))
    with pytest.raises(RecordError, match=r"tiny train record 2: tool schema is not valid for OpenAI-style tool "
                                          r"calling: function 'get_order_total': .*order_id: an array needs 'items'"):
        export_records([make_record(), no_items], "tiny train")
    with pytest.raises(RecordError, match=r"x record 1: a stateful environment \(field 'state'\)"):
        export_records([make_record(state='{"family": "taubench"}')], "x")
