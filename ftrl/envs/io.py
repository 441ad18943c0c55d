"""Reference-format record I/O: JSON lines and Parquet readers/writers, record validation, hashing.

Every environment and snapshot file holds records in the FTRL reference schema (docs/reference.md §2,
``ftrl.types.REFERENCE_FIELDS``). This module reads and writes them without losing fields (extra
keys such as ``gold_calls`` are kept), validates them with errors that name the file, the line
and the field, and hashes an environment set for run manifests.

    python -c "from ftrl.envs.io import read_records; print(len(read_records('envs/train.jsonl')))"
    python -m pytest tests/test_envs_io.py -q
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ftrl.artifacts import atomic_path, atomic_write
from ftrl.config import FilesConfig
from ftrl.errors import FtrlError
from ftrl.types import REFERENCE_FIELDS, SPLITS

log = logging.getLogger(__name__)

PathLike = str | os.PathLike
ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")
# Message keys always kept when Parquet reads back None (the rest are optional and dropped if None).
_MESSAGE_CORE_KEYS: frozenset[str] = frozenset({"role", "content"})


class RecordError(FtrlError, ValueError):
    """A record (or a file of them) does not follow the reference schema; the message says where.

    A user-fixable input problem (:class:`~ftrl.errors.FtrlError`): the entrypoints print it as one line.
    """


# ----------------------------------------------------------------------------------------- reading
def iter_records(path: PathLike, *, drop_partial_last_line: bool = False) -> Iterator[tuple[str, dict]]:
    """Yield ``(location, record)`` pairs; ``location`` is ``file:line`` (JSONL) or ``file:row N``.

    ``drop_partial_last_line`` tolerates a last line that is not valid JSON and lacks its newline:
    what a crash in the middle of :func:`append_jsonl` leaves behind (collection resumes from it).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such record file: '{path}'")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _iter_jsonl(path, drop_partial_last_line)
    elif suffix == ".parquet":
        for row_number, record in enumerate(_read_parquet_rows(path), start=1):
            yield f"{path}:row {row_number}", record
    else:
        raise RecordError(f"{path}: unsupported record file type '{suffix}'; valid: ['.jsonl', '.parquet']")


def read_records(path: PathLike, *, drop_partial_last_line: bool = False) -> list[dict]:
    """All records of a ``.jsonl`` or ``.parquet`` file, in file order, every field kept."""
    return [record for _, record in iter_records(path, drop_partial_last_line=drop_partial_last_line)]


def _iter_jsonl(path: Path, drop_partial_last_line: bool) -> Iterator[tuple[str, dict]]:
    with open(path, "rb") as handle:
        raw = handle.read()
    lines = raw.split(b"\n")
    ends_with_newline = raw.endswith(b"\n")
    for index, line in enumerate(lines):
        line_number = index + 1
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            is_tail = index == len(lines) - 1 and not ends_with_newline
            if drop_partial_last_line and is_tail:
                log.warning("%s:%d: dropping a partial last line (%d bytes) left by an interrupted write",
                            path, line_number, len(line))
                return
            raise RecordError(f"{path}:{line_number}: line is not valid JSON: {error}") from None
        if not isinstance(record, dict):
            raise RecordError(f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}")
        yield f"{path}:{line_number}", record


def _read_parquet_rows(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    rows = pq.read_table(path).to_pylist()
    for row in rows:
        if isinstance(row.get("messages"), list):
            row["messages"] = [_drop_absent_message_keys(m) for m in row["messages"]]
    return rows


def _drop_absent_message_keys(message: Any) -> Any:
    """Parquet stores messages as structs, so a key one message lacks reads back as None; drop it.

    Only optional keys go (``tool_calls``, ``tool_call_id``, ...); ``role``/``content`` stay even when
    None. A message written with ``tool_calls: None`` therefore reads back without the key, which
    chat templates and the reward treat the same way.
    """
    if not isinstance(message, dict):
        return message
    return {key: value for key, value in message.items() if value is not None or key in _MESSAGE_CORE_KEYS}


# ----------------------------------------------------------------------------------------- writing
def _json_line(record: Mapping[str, Any], index: int, path: Path) -> str:
    try:
        return json.dumps(record, ensure_ascii=False) + "\n"
    except (TypeError, ValueError) as error:
        raise RecordError(f"{path}: record {index} cannot be written as JSON: {error}") from None


def write_jsonl(path: PathLike, records: Iterable[Mapping[str, Any]]) -> Path:
    """Write records as JSON lines atomically (temp file, fsync, rename): readers never see half a file."""
    path = Path(path)
    with atomic_write(path, fsync=True) as handle:
        handle.writelines(_json_line(record, index, path) for index, record in enumerate(records))
    return path


def parquet_columns(records: Sequence[Mapping[str, Any]], where: PathLike = "<records>") -> list[str]:
    """The columns a Parquet copy of ``records`` gets: every field, present on all rows or on none.

    A reference field (docs/reference.md §2) some records lack is an error naming the first such
    record. An extra field only some records carry (``gold_calls`` on the first snapshot of each
    episode, which is the environment record itself) is left out, with a log line: a column that
    is null on some rows is a schema a reader cannot trust (a validator decodes it and fails on the
    nulls). The JSON lines copy keeps every field.
    """
    counts: dict[str, int] = {}
    for record in records:
        for key in record:
            counts[key] = counts.get(key, 0) + 1
    total = len(records)
    for key in REFERENCE_FIELDS:
        if 0 < counts.get(key, 0) < total:
            first = next(index for index, record in enumerate(records) if key not in record)
            raise RecordError(f"{where}: record {first} lacks reference field '{key}', which "
                              f"{counts[key]} of {total} records have")
    partial = sorted(key for key, count in counts.items() if count < total)
    if partial:
        log.info("%s: fields on some records only, left out of the Parquet copy: %s", where,
                 ", ".join(f"{key} ({counts[key]} of {total})" for key in partial))
    return [key for key, count in counts.items() if count == total]


def write_parquet(path: PathLike, records: Sequence[Mapping[str, Any]]) -> Path:
    """Write records as Parquet (atomic), one column per field, messages as native structs.

    Columns are :func:`parquet_columns`: the fields every record has (a column is never null on
    some rows because a record lacks the field). Tool-call ``arguments`` given as dicts are stored
    as their JSON string, the OpenAI wire format: as structs, calls with different argument names
    would read back padded with None keys.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = parquet_columns(records, path)
    rows = [_parquet_ready(record) for record in records]
    arrays = {}
    for key in columns:
        values = [row.get(key) for row in rows]
        try:
            arrays[key] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as error:
            raise RecordError(f"{path}: field '{key}' cannot be stored as one Parquet column "
                              f"(its values differ in type across records): {error}") from None
    table = pa.table(arrays) if arrays else pa.table({})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def _parquet_ready(record: Mapping[str, Any]) -> dict[str, Any]:
    row = dict(record)
    messages = row.get("messages")
    if isinstance(messages, list):
        row["messages"] = [_stringify_call_arguments(message) for message in messages]
    return row


def _stringify_call_arguments(message: Any) -> Any:
    if not isinstance(message, dict) or not message.get("tool_calls"):
        return message
    calls = []
    for call in message["tool_calls"]:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict) and not isinstance(function.get("arguments"), (str, type(None))):
            call = {**call, "function": {**function,
                                         "arguments": json.dumps(function["arguments"], ensure_ascii=False)}}
        calls.append(call)
    return {**message, "tool_calls": calls}


# -------------------------------------------------------------------------------------- validation
def _decode_json_field(record: Mapping[str, Any], key: str, where: str, expected: type) -> Any:
    value = record[key]
    if isinstance(value, (str, bytes, bytearray)):
        try:
            value = json.loads(value)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise RecordError(f"{where}: field '{key}' is not valid JSON: {error}") from None
    if not isinstance(value, expected):
        raise RecordError(f"{where}: field '{key}' must be a JSON {expected.__name__} "
                          f"(or its JSON string), got {type(value).__name__}")
    return value


def _check_messages(record: Mapping[str, Any], where: str) -> None:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise RecordError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} messages")
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise RecordError(f"{where}: messages[{index}] must be an object with 'role' and 'content'")
        if message["role"] not in ROLES:
            raise RecordError(f"{where}: messages[{index}].role '{message['role']}' is not one of {list(ROLES)}")


def _check_tools(record: Mapping[str, Any], where: str) -> list[str]:
    """The names of the record's tools, which must be OpenAI function schemas."""
    tools = _decode_json_field(record, "tools", where, list)
    tool_names: list[str] = []
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise RecordError(f"{where}: tools[{index}] is not an OpenAI function schema "
                              f"{{'type': 'function', 'function': {{'name': ..., 'parameters': ...}}}}")
        if "parameters" in function and not isinstance(function["parameters"], dict):
            raise RecordError(f"{where}: tools[{index}] ('{function['name']}') parameters must be an object")
        tool_names.append(function["name"])
    return tool_names


def _check_codes(record: Mapping[str, Any], where: str) -> dict[str, Any]:
    codes = _decode_json_field(record, "codes", where, dict)
    for name, source in codes.items():
        if not isinstance(source, str):
            raise RecordError(f"{where}: codes['{name}'] must be Python source text, got {type(source).__name__}")
    return codes


def _check_unsolved_set(
    record: Mapping[str, Any], where: str, tool_names: list[str], codes: Mapping[str, Any]
) -> None:
    unsolved_set = _decode_json_field(record, "unsolved_set", where, dict)
    for name, answers in unsolved_set.items():
        if name not in tool_names or name not in codes:
            raise RecordError(f"{where}: unsolved_set key '{name}' is not a tool in tools/codes "
                              f"(tools: {sorted(tool_names)}, codes: {sorted(codes)})")
        if not isinstance(answers, list):
            raise RecordError(f"{where}: unsolved_set['{name}'] must be a list of expected answers")


def _check_scalars(record: Mapping[str, Any], where: str) -> None:
    if record["split"] not in SPLITS:
        raise RecordError(f"{where}: field 'split' is '{record['split']}'; valid: {list(SPLITS)}")
    if not isinstance(record["answer"], str):
        raise RecordError(f"{where}: field 'answer' must be a string, got {type(record['answer']).__name__}")
    solve_rate = record["solve_rate"]
    if isinstance(solve_rate, bool) or not isinstance(solve_rate, (int, float)):
        raise RecordError(f"{where}: field 'solve_rate' must be a number, got {solve_rate!r}")


def _check_gold_calls(record: Mapping[str, Any], where: str, tool_names: list[str]) -> None:
    turns = _decode_json_field(record, "gold_calls", where, list)
    for turn_index, turn in enumerate(turns):
        for call in turn if isinstance(turn, list) else [None]:
            if not isinstance(call, dict) or not isinstance(call.get("arguments"), dict):
                raise RecordError(f"{where}: gold_calls[{turn_index}] must be a list of "
                                  "{'name': str, 'arguments': {...}} calls")
            if call.get("name") not in tool_names:
                raise RecordError(f"{where}: gold_calls[{turn_index}] calls '{call.get('name')}', "
                                  f"which is not a tool in tools {sorted(tool_names)}")


def validate_record(record: Mapping[str, Any], where: str) -> None:
    """Check one record against the reference schema; raise :class:`RecordError` naming ``where``.

    ``where`` is the location to report, e.g. ``"train.jsonl:17"``. Checks: every reference field
    present; ``tools``/``codes``/``unsolved_set`` decode (JSON string or already decoded); tools are
    OpenAI function schemas with names; each ``unsolved_set`` key is a tool in ``tools`` and
    ``codes``; ``split`` is train/test; ``messages`` is a non-empty list of ``{role, content}``;
    and, when present, ``gold_calls`` (procedural environments) names only known tools.
    """
    if not isinstance(record, Mapping):
        raise RecordError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    for key in REFERENCE_FIELDS:
        if key not in record:
            raise RecordError(f"{where}: missing field '{key}' (reference fields: {list(REFERENCE_FIELDS)})")
    _check_messages(record, where)
    tool_names = _check_tools(record, where)
    codes = _check_codes(record, where)
    _check_unsolved_set(record, where, tool_names, codes)
    _check_scalars(record, where)
    if "gold_calls" in record:
        _check_gold_calls(record, where, tool_names)


# ------------------------------------------------------------------------------- OpenAI tool schemas
JSON_SCHEMA_TYPES: frozenset[str] = frozenset({"string", "integer", "number", "boolean", "array", "object", "null"})
_FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _value_schema_problems(spec: Any, where: str) -> list[str]:
    """Problems of one parameter's JSON schema (recursing into ``items`` and object ``properties``)."""
    if not isinstance(spec, dict):
        return [f"{where}: must be a JSON schema object, got {type(spec).__name__}"]
    for key in ("anyOf", "oneOf"):
        if key in spec:
            options = spec[key]
            if not isinstance(options, list) or not options:
                return [f"{where}.{key}: must be a non-empty list of schemas"]
            return [p for i, option in enumerate(options) for p in _value_schema_problems(option, f"{where}.{key}[{i}]")]
    declared = spec.get("type")
    types = [declared] if isinstance(declared, str) else declared
    if not isinstance(types, list) or not types or not all(isinstance(t, str) for t in types):
        return [f"{where}: 'type' must be a JSON type or a non-empty list of them, got {declared!r}"]
    problems = [f"{where}: unknown type '{t}' (valid: {sorted(JSON_SCHEMA_TYPES)})" for t in types
                if t not in JSON_SCHEMA_TYPES]
    if "enum" in spec and (not isinstance(spec["enum"], list) or not spec["enum"]):
        problems.append(f"{where}: 'enum' must be a non-empty list")
    if "description" in spec and not isinstance(spec["description"], str):
        problems.append(f"{where}: 'description' must be a string")
    if "array" in types:
        if "items" not in spec:
            problems.append(f"{where}: an array needs 'items' (the schema of its elements)")
        else:
            problems += _value_schema_problems(spec["items"], f"{where}.items")
    if "object" in types and ("properties" in spec or "required" in spec):
        problems += _object_problems(spec, where)
    return problems


def _object_problems(spec: Mapping[str, Any], where: str) -> list[str]:
    properties = spec.get("properties", {})
    if not isinstance(properties, dict):
        return [f"{where}.properties: must be an object"]
    required = spec.get("required", [])
    if not isinstance(required, list) or not all(isinstance(name, str) for name in required):
        return [f"{where}.required: must be a list of parameter names"]
    problems = [f"{where}.required: '{name}' is not in properties" for name in required if name not in properties]
    for name, value in properties.items():
        problems += _value_schema_problems(value, f"{where}.properties.{name}")
    return problems


def tool_schema_problems(tool: Any) -> list[str]:
    """What keeps ``tool`` from being a valid OpenAI-style function tool; empty when it is one.

    ``{"type": "function", "function": {"name", "description"?, "parameters"}}`` with a name of at
    most 64 letters, digits, ``_`` or ``-``; ``parameters`` of type ``object`` with ``properties``;
    ``required`` a subset of them; every parameter a JSON schema with known types (one or a list),
    a non-empty ``enum`` where given, and ``items`` wherever ``array`` is a type (recursively).
    """
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
        return ["must be {'type': 'function', 'function': {...}}"]
    function = tool["function"]
    name = function.get("name")
    where = f"function '{name}'"
    problems = [] if isinstance(name, str) and _FUNCTION_NAME.match(name) else [
        f"{where}: name must be 1-64 letters, digits, '_' or '-'"]
    if "description" in function and not isinstance(function["description"], str):
        problems.append(f"{where}: description must be a string")
    parameters = function.get("parameters")
    if not isinstance(parameters, dict) or parameters.get("type") != "object":
        return problems + [f"{where}: parameters must be a JSON schema of type 'object'"]
    if not isinstance(parameters.get("properties"), dict):
        return problems + [f"{where}: parameters.properties must be an object"]
    return problems + _object_problems(parameters, f"{where}: parameters")


def reference_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """Exactly the reference fields of ``record`` (docs/reference.md §2), in their order; extras dropped."""
    return {key: record[key] for key in REFERENCE_FIELDS}


STORED_AS_STRINGS: tuple[str, ...] = ("tools", "codes", "unsolved_set", "gold_calls")


def check_stored_strings(record: Mapping[str, Any], where: str) -> None:
    """``tools``/``codes``/``unsolved_set``/``gold_calls`` (when present) must be JSON strings.

    The reference format stores them as strings (docs/reference.md §2) and its trainer ``json.loads``
    them; a list or object given directly would also reach Parquet as a struct column, which cannot
    hold tools or codes whose shapes differ between records (the round-2 snapshot write fails). So an
    input file that stores one decoded is refused here, at its line, rather than silently rewritten.
    """
    for key in STORED_AS_STRINGS:
        value = record.get(key)
        if value is not None and not isinstance(value, str):
            raise RecordError(f"{where}: field '{key}' must be stored as a JSON string (the reference format), "
                              f"got a {type(value).__name__}; write it as json.dumps(...)")


# ------------------------------------------------------------------------------ environment sources
def load_ftrl_files(
    files_cfg: FilesConfig, *, validate: bool = True, locations: dict[str, list[str]] | None = None
) -> dict[str, list[dict]]:
    """Load the reference ``train``/``test`` files (``.jsonl`` or ``.parquet``) named by ``envs.files``.

    Either path may be unset (that split comes back empty); a set path that does not exist, or a
    record that breaks the schema (``validate``: :func:`validate_record` and
    :func:`check_stored_strings`), or a file without records, raises with the config key, the file
    and the line. Records keep every field, extra ones included. ``locations``, when given, receives
    each record's ``file:line`` per split (for the environment gate's report).
    """
    paths = {"train": files_cfg.train, "test": files_cfg.test}
    if not any(paths.values()):
        raise FileNotFoundError("envs.files.train / envs.files.test: both unset; envs=ftrl_files needs "
                                "at least one path to a reference .jsonl or .parquet file")
    loaded: dict[str, list[dict]] = {}
    for split, raw_path in paths.items():
        if not raw_path:
            loaded[split] = []
            continue
        path = Path(raw_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"envs.files.{split}: no such file '{path}' (resolved from '{raw_path}', "
                                    f"cwd {Path.cwd()})")
        records = []
        mismatched = 0
        places = []
        for where, record in iter_records(path):
            if validate:
                validate_record(record, where)
                check_stored_strings(record, where)
            mismatched += record.get("split") != split
            records.append(record)
            places.append(where)
        if not records:
            raise RecordError(f"envs.files.{split}: '{path}' holds no records; point it at a non-empty reference "
                              f"file or leave envs.files.{split} unset")
        if locations is not None:
            locations[split] = places
        if mismatched:
            log.warning("envs.files.%s: %d of %d records in %s say another split; they are used as %s",
                        split, mismatched, len(records), path, split)
        log.info("envs.files.%s: loaded %d records from %s", split, len(records), path)
        loaded[split] = records
    return loaded


# ------------------------------------------------------------------------------------------ hashing
def canonical_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """The record with JSON-string fields decoded and absent message keys dropped.

    Two copies of an environment hash the same whether read from JSONL or Parquet and whatever
    whitespace their JSON strings use.
    """
    canonical = dict(record)
    for key in ("tools", "codes", "unsolved_set", "gold_calls"):
        value = canonical.get(key)
        if isinstance(value, (str, bytes, bytearray)):
            try:
                canonical[key] = json.loads(value)
            except (json.JSONDecodeError, UnicodeDecodeError):
                pass  # hash the raw text; validation is where a bad field gets reported
    if isinstance(canonical.get("messages"), list):
        canonical["messages"] = [_drop_absent_message_keys(m) for m in canonical["messages"]]
    return canonical


def env_set_hash(records_by_split: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    """Content hash (16 hex chars of SHA-256) of an environment set, for run manifests."""
    payload = {split: [canonical_record(r) for r in records] for split, records in records_by_split.items()}
    text = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
