"""The environment gates: the build-time gate of both builders, and the gate of ``build_envs``.

**Build-time gate** (:func:`gate_candidates`; the procedural generator calls it through
:func:`ftrl.envs.procedural.gate`, and so does the LLM builder). A candidate environment is probed
in the sandbox and refused with a reason code (:data:`REASONS` says each in words) and the evidence:
gold calls that error, time out, leave a sub-question unsolved or miss the final answer; gold calls
that differ when run twice (``tool_not_deterministic``); a sub-answer the reference's substring
check hits by accident (``answer_matches_by_accident``: inside another sub-answer, inside a longer
constant of its tool's code, or inside a longer word of one of its tool's outputs: gold "10" and a
table value "100"); a gold output that already holds another call's sub-answer of the same or a
later turn (``answer_leaks_into_other_hop``: the model could skip that call); invalid probes that
succeed, leak the answer or fail with an error naming neither the parameter nor the value at fault
(``error_not_informative``); distractors that fail or answer. Then, for the first gold call of each
tool, probes derived from its schema: harmless variants of free-text string arguments (lower-case,
upper-case, surrounding spaces; not enum values, which are exact spellings, nor numbers, booleans,
arrays or objects) must keep the sub-answer (``harmless_variant_fails``), and what complexity
scaling adds must work (``scaled_feature_fails``): every other declared type of a parameter and the
array form keep the sub-answer, every optional parameter and every enum value does not fail.

**build_envs gate** (:func:`gate_records`). A reference file (``envs=ftrl_files``), a stored set or an
imported family gets the following checks after loading, so no environment reaches collection,
the warm start or evaluation unchecked. Per record, in order (the first failure is the reason it
is dropped):

1. ``invalid_record``: :func:`ftrl.envs.io.validate_record` (every reference field, types, tools
   are function schemas, ``unsolved_set``/``gold_calls`` name known tools);
2. ``not_a_json_string``: ``tools``/``codes``/``unsolved_set``/``gold_calls`` are stored as JSON
   strings, as the reference format requires (:func:`ftrl.envs.io.check_stored_strings`);
3. ``syntax_error``: every tool's code compiles; ``tool_not_defined``: it binds the tool's name;
4. where ``gold_calls`` exist, they run in the sandbox (stateful families through
   :class:`~ftrl.envs.executor.StatefulExecutor`, on a fresh copy of their database;
   ``state_unavailable`` when it cannot be found) with the run's tool timeout: ``tool_timeout``
   when a call does not return in time, ``gold_call_error`` when one returns an error, and
   ``gold_leaves_unsolved`` when, applied turn by turn with the reward's rules, they do not solve
   every sub-question.

A record without ``gold_calls`` (the reference release) gets checks 1-3 only: without gold
arguments there is nothing to call. ``envs.invalid=drop`` (default) drops failing records and
reports them (counts per reason and the first examples, each naming ``file:line`` or the split and
record number); ``envs.invalid=fail`` refuses the set instead.

    python -m pytest tests/test_env_gate.py tests/test_procedural.py -q
"""

from __future__ import annotations

import ast
import copy
import json
import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ftrl.envs.io import RecordError, check_stored_strings, validate_record
from ftrl.envs.verify import answer_verify, apply_tool_results, normalise_answer
from ftrl.types import count_answers, format_tool_error, make_tool_call

log = logging.getLogger(__name__)

INVALID_MODES: tuple[str, ...] = ("drop", "fail")
MAX_EXAMPLES = 5  # examples kept per reason in the report

INVALID_RECORD = "invalid_record"
NOT_A_JSON_STRING = "not_a_json_string"
SYNTAX_ERROR = "syntax_error"
TOOL_NOT_DEFINED = "tool_not_defined"
STATE_UNAVAILABLE = "state_unavailable"
TOOL_TIMEOUT = "tool_timeout"
GOLD_CALL_ERROR = "gold_call_error"
GOLD_UNSOLVED = "gold_leaves_unsolved"
# The sandbox's own limit messages (ftrl/envs/sandbox/worker.py, pool.py): a call that never returned.
_TIMEOUT_MARKERS = ("timed out after ", "CPU time limit exceeded")

# CPython 3.11's AST converter keeps its recursion depth in interpreter-wide state: two threads
# parsing at once (the builder's stages run in a thread pool) can fail with "SystemError: AST
# constructor recursion depth mismatch". Every parse and AST compile of the gates goes through one lock.
_AST_LOCK = threading.Lock()


def parse_python(source: str, filename: str = "<unknown>") -> ast.Module:
    """``ast.parse`` that is safe to call from several threads at once (raises what ``ast.parse`` raises)."""
    with _AST_LOCK:
        return ast.parse(source, filename=filename)


def compile_python(tree: ast.Module, filename: str) -> Any:
    """``compile`` of an AST, serialised with :func:`parse_python` for the same reason."""
    with _AST_LOCK:
        return compile(tree, filename, "exec")

Executor = Callable[[Sequence[tuple[Any, ...]]], list[list[str]]]


class EnvGateError(RecordError):
    """``envs.invalid=fail`` and a record failed the gate, or a split the run needs is empty."""


# ------------------------------------------------------------------------------------- shared pieces
def gold_call(call: Mapping[str, Any], index: int) -> dict[str, Any]:
    """A gold ``{"name", "arguments"}`` call as the OpenAI tool call the sandbox runs."""
    return make_tool_call(call["name"], call["arguments"], f"gate_{index}")


def is_error(output: str, name: str) -> bool:
    return str(output).startswith(format_tool_error(name, ""))


def judge_gold(
    turns: Sequence[Sequence[Mapping[str, Any]]],
    outputs: Sequence[str],
    expected: Mapping[str, list[str]],
) -> tuple[str | None, str]:
    """``(None, "")`` when the gold calls' ``outputs`` solve every sub-answer, else ``(reason, detail)``.

    ``turns`` are the gold calls by turn, ``outputs`` the outputs of every call flattened in that
    order; each turn's outputs are applied with the reward's rules before the next.
    """
    cursor = 0
    unsolved = copy.deepcopy(dict(expected))
    for turn_index, turn in enumerate(turns):
        turn_outputs = list(outputs[cursor:cursor + len(turn)])
        cursor += len(turn)
        for call, output in zip(turn, turn_outputs):
            if is_error(output, call["name"]):
                arguments = json.dumps(call["arguments"], ensure_ascii=False)[:200]
                shown = f"gold_calls[{turn_index}] {call['name']}({arguments}) -> {output[:300]!r}"
                reason = TOOL_TIMEOUT if any(m in output for m in _TIMEOUT_MARKERS) else GOLD_CALL_ERROR
                return reason, shown
        apply_tool_results([gold_call(call, i) for i, call in enumerate(turn)], turn_outputs, unsolved)
    if count_answers(unsolved):
        left = {name: answers for name, answers in unsolved.items() if answers}
        return GOLD_UNSOLVED, f"after every gold call, unsolved: {json.dumps(left, ensure_ascii=False)[:300]}"
    return None, ""


def _bound_names(tree: ast.AST) -> set[str]:
    """Every name the module binds anywhere (def, class, assignment, import, global): a loose test."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.alias):
            names.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, ast.Global):
            names.update(node.names)
    return names


def check_codes(codes: Mapping[str, str]) -> tuple[str | None, str]:
    """``(None, "")`` when every tool's source compiles and binds its name, else ``(reason, detail)``."""
    for name, source in codes.items():
        try:
            tree = parse_python(source, filename=f"codes['{name}']")
            compile_python(tree, f"codes['{name}']")
        except (SyntaxError, ValueError, RecursionError, MemoryError) as error:
            line = getattr(error, "lineno", None)
            where = f" line {line}" if line else ""
            message = getattr(error, "msg", None) or str(error) or type(error).__name__
            return SYNTAX_ERROR, f"codes['{name}']{where}: {type(error).__name__}: {message}"
        if name not in _bound_names(tree):
            return TOOL_NOT_DEFINED, f"codes['{name}'] does not define '{name}'"
    return None, ""


# ------------------------------------------------------------------------------------------ the gate
@dataclass
class GateReport:
    """What the gate did: records checked and kept per split, drops per reason with examples."""

    mode: str
    timeout_s: float
    checked: dict[str, int] = field(default_factory=dict)
    kept: dict[str, int] = field(default_factory=dict)
    without_gold_calls: int = 0  # checked by schema and compilation only
    dropped: dict[str, int] = field(default_factory=dict)
    examples: list[dict[str, str]] = field(default_factory=list)  # {where, reason, detail}
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """For ``envs/manifest.json`` (without the wall time, so the manifest stays reproducible)."""
        data = asdict(self)
        data.pop("seconds")
        return data

    def summary(self) -> str:
        checked = sum(self.checked.values())
        dropped = sum(self.dropped.values())
        reasons = ", ".join(f"{reason}={n}" for reason, n in self.dropped.items()) or "none"
        text = (f"env gate: {checked} records checked in {self.seconds:.2f}s ({self.without_gold_calls} without "
                f"gold_calls: schema and compile checks only); dropped {dropped}: {reasons}")
        return text + "".join(f"\n  {e['where']}: {e['reason']}: {e['detail']}" for e in self.examples)


@dataclass
class _Pending:
    split: str
    index: int
    where: str
    turns: list[list[dict[str, Any]]]
    expected: dict[str, list[str]]


def _strip_where(message: str, where: str) -> str:
    prefix = f"{where}: "
    return message.removeprefix(prefix)


def _default_executor(timeout: float) -> Executor:
    from ftrl.envs.executor import StatefulExecutor

    return StatefulExecutor(timeout=timeout)


def _count_failures(report: GateReport, failures: Sequence[tuple[str, int, str, str, str]]) -> None:
    """Counts per reason and the first MAX_EXAMPLES examples of each, into ``report``."""
    counts: Counter[str] = Counter()
    for _, _, where, reason, detail in failures:
        counts[reason] += 1
        if counts[reason] <= MAX_EXAMPLES:
            report.examples.append({"where": where, "reason": reason, "detail": detail})
    report.dropped = dict(sorted(counts.items()))


def gate_records(
    splits: Mapping[str, Sequence[dict[str, Any]]],
    *,
    timeout: float,
    invalid: str = "drop",
    locations: Mapping[str, Sequence[str]] | None = None,
    executor: Executor | None = None,
) -> tuple[dict[str, list[dict[str, Any]]], GateReport]:
    """The records of ``splits`` that pass every check (same objects, same order) and the report.

    ``locations[split][i]`` names record i (``file:line``); without it, ``"<split> record <i+1>"``.
    ``executor`` runs the gold calls (default: a :class:`~ftrl.envs.executor.StatefulExecutor` on
    the process-wide sandbox with ``timeout``). ``invalid="fail"`` raises :class:`EnvGateError`
    naming every failing record's place and reason (the first few) instead of dropping them.
    """
    if invalid not in INVALID_MODES:
        raise ValueError(f"envs.invalid: '{invalid}' is not one of {list(INVALID_MODES)}")
    started = time.perf_counter()
    run = executor if executor is not None else _default_executor(timeout)
    store = getattr(run, "databases", None)  # a StatefulExecutor's databases: resolved per record below
    resolved: set[tuple[Any, ...]] = set()
    report = GateReport(mode=invalid, timeout_s=float(timeout))
    failures: list[tuple[str, int, str, str, str]] = []  # split, index, where, reason, detail
    pending: list[_Pending] = []
    jobs: list[tuple[Any, ...]] = []
    for split, records in splits.items():
        report.checked[split] = len(records)
        places = list(locations.get(split, [])) if locations else []
        for index, record in enumerate(records):
            where = places[index] if index < len(places) else f"{split} record {index + 1}"
            reason, detail, job = _static_checks(record, where, store, resolved)
            if reason is not None:
                failures.append((split, index, where, reason, detail))
            elif job is None:
                report.without_gold_calls += 1
            else:
                turns, expected, job_tuple = job
                pending.append(_Pending(split, index, where, turns, expected))
                jobs.append(job_tuple)
    if jobs:
        for item, outputs in zip(pending, run(jobs)):
            reason, detail = judge_gold(item.turns, outputs, item.expected)
            if reason is not None:
                failures.append((item.split, item.index, item.where, reason, detail))
    failures.sort(key=lambda f: (list(splits).index(f[0]), f[1]))
    _count_failures(report, failures)
    bad = {(split, index) for split, index, *_ in failures}
    kept = {split: [r for i, r in enumerate(records) if (split, i) not in bad] for split, records in splits.items()}
    report.kept = {split: len(records) for split, records in kept.items()}
    report.seconds = time.perf_counter() - started
    if failures and invalid == "fail":
        shown = "\n".join(f"  {e['where']}: {e['reason']}: {e['detail']}" for e in report.examples)
        raise EnvGateError(
            f"envs.invalid=fail: {len(failures)} of {sum(report.checked.values())} environments fail the gate "
            f"({', '.join(f'{r}={n}' for r, n in report.dropped.items())}):\n{shown}\n"
            "fix them, or set envs.invalid=drop to drop them with a report"
        )
    return kept, report


def _static_checks(
    record: Any, where: str, store: Any, resolved: set[tuple[Any, ...]]
) -> tuple[str | None, str, tuple[list, dict, tuple[Any, ...]] | None]:
    """Schema, storage and compile checks; then the gold-call job to run, if the record has gold calls."""
    try:
        validate_record(record, where)
    except RecordError as error:
        return INVALID_RECORD, _strip_where(str(error), where), None
    try:
        check_stored_strings(record, where)
    except RecordError as error:
        return NOT_A_JSON_STRING, _strip_where(str(error), where), None
    codes = json.loads(record["codes"])
    reason, detail = check_codes(codes)
    if reason is not None:
        return reason, detail, None
    turns = json.loads(record["gold_calls"]) if record.get("gold_calls") is not None else []
    if not turns:
        return None, "", None
    calls = [gold_call(call, i) for i, call in enumerate(c for turn in turns for c in turn)]
    from ftrl.envs.executor import TurnContext, record_state

    try:
        state = record_state(record)
        key = None if state is None else (state.get("domain"), state.get("db_sha256"), "db" in state)
        if key is not None and store is not None and key not in resolved:
            store.get(state)  # loading a database costs seconds: once per (domain, hash)
            resolved.add(key)
    except (ValueError, OSError, KeyError) as error:
        return STATE_UNAVAILABLE, str(error)[:300], None
    job = (codes, calls) if state is None else (codes, calls, TurnContext(record, []))
    return None, "", (turns, json.loads(record["unsolved_set"]), job)


# ---------------------------------------------------------------------------------- needed splits
def check_needed_splits(
    splits: Mapping[str, Sequence[Any]],
    needed: Mapping[str, str],
    origins: Mapping[str, str],
    report: GateReport | None = None,
) -> None:
    """Refuse a split the run needs (``needed[split]`` says which stage) that holds no environment."""
    for split, reason in needed.items():
        if splits.get(split):
            continue
        origin = origins.get(split) or "the environment source"
        checked = report.checked.get(split, 0) if report is not None else 0
        why = (f"all {checked} records were dropped by the gate ({', '.join(f'{r}={n}' for r, n in report.dropped.items())})"
               if report is not None and checked else "it holds no records")
        raise EnvGateError(f"envs: the {split} split from {origin} is empty: {why}; {reason} needs {split} environments")


# ================================================================================ build-time gate
# The builders (ftrl.envs.procedural, ftrl.builder) gate each candidate environment before they keep
# it, with probes that need the builder's knowledge (invalid calls, distractor calls) or that are
# derived here from the record's schemas and gold calls. Reasons, in the order they are checked:
ANSWER_UNREACHABLE = "answer_not_in_outputs"
NONDETERMINISTIC = "tool_not_deterministic"
ACCIDENTAL_MATCH = "answer_matches_by_accident"
HOP_LEAK = "answer_leaks_into_other_hop"
INVALID_CALL_ACCEPTED = "invalid_call_accepted"
INVALID_CALL_LEAKS = "invalid_call_returns_answer"
ERROR_UNINFORMATIVE = "error_not_informative"
DISTRACTOR_BROKEN = "distractor_error"
DISTRACTOR_ANSWERS = "distractor_returns_answer"
VARIANT_FAILS = "harmless_variant_fails"
SCALED_FEATURE_FAILS = "scaled_feature_fails"

# The checks beyond the gold calls, invalid probes and distractors; each can be left out (``checks``).
PROBE_CHECKS: tuple[str, ...] = (NONDETERMINISTIC, ACCIDENTAL_MATCH, HOP_LEAK, ERROR_UNINFORMATIVE, VARIANT_FAILS,
                                 SCALED_FEATURE_FAILS)

# One human-readable sentence per reason, for reports (``envs/manifest.json``, a set's report.json).
REASONS: dict[str, str] = {
    INVALID_RECORD: "the record breaks the reference schema",
    NOT_A_JSON_STRING: "tools/codes/unsolved_set/gold_calls are not stored as JSON strings",
    SYNTAX_ERROR: "a tool's code does not compile",
    TOOL_NOT_DEFINED: "a tool's code does not define a function of the tool's name",
    STATE_UNAVAILABLE: "the database of a stateful environment cannot be found",
    TOOL_TIMEOUT: "a gold call does not return within the timeout",
    GOLD_CALL_ERROR: "a gold call returns an error",
    GOLD_UNSOLVED: "the gold calls, applied with the reward's rules, leave a sub-question unsolved",
    ANSWER_UNREACHABLE: "a part of the final answer occurs in no gold output",
    NONDETERMINISTIC: "the same gold call, run twice, returns different outputs",
    ACCIDENTAL_MATCH: ("a sub-answer matches by accident: it occurs inside another sub-answer, inside a longer "
                       "value the tool can return, or inside a longer word of an output (gold '10' in '100')"),
    HOP_LEAK: ("a gold output already holds the sub-answer of another call of the same or a later turn, "
               "so a model could skip that call"),
    INVALID_CALL_ACCEPTED: "an invalid call (unknown value, wrong type, missing argument) does not fail",
    INVALID_CALL_LEAKS: "an invalid call's error message contains the tool's sub-answer",
    ERROR_UNINFORMATIVE: "an invalid call's error names neither the parameter nor the value at fault",
    DISTRACTOR_BROKEN: "a distractor tool fails on a plausible call",
    DISTRACTOR_ANSWERS: "a distractor tool returns a sub-answer",
    VARIANT_FAILS: ("a harmless variant of a string argument (lower/upper case, surrounding spaces) fails or "
                    "loses the sub-answer"),
    SCALED_FEATURE_FAILS: ("an alternative parameter type, the array form, an optional parameter or an enum value "
                           "the schema offers fails (type forms must also keep the sub-answer)"),
}

_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,),
    "array": (list,), "object": (dict,), "null": (type(None),),
}
_NOT_CONVERTIBLE = object()
_ID_DIGITS = re.compile(r"\s*[A-Za-z]{0,3}([1-9][0-9]*|0)\s*")


@dataclass
class Candidate:
    """An environment before the build-time gate: the record plus the probe calls only its builder knows."""

    record: dict[str, Any]
    # What the question asks: each chain's root id and the fields it walks. A test question may not
    # ask what a train question asks, however it is worded.
    id_combination: tuple[str, ...]
    invalid_calls: list[dict[str, Any]]     # {"name", "arguments"}: each must come back as an error
    distractor_calls: list[dict[str, Any]]  # plausible calls of distractor tools
    # Which complexity-scaling strategies the builder drew (``{"functional_generalization": True, ...,
    # "distractors": 2}``); empty when the builder does not say.
    scaling: dict[str, Any] = field(default_factory=dict)

    @property
    def question(self) -> str:
        return str(self.record["messages"][0]["content"])


@dataclass(frozen=True)
class Rejection:
    """Why the build-time gate refused a candidate: a reason code and the evidence, in words."""

    reason: str
    detail: str

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


@dataclass(frozen=True)
class _Probe:
    call: dict[str, Any]   # {"name", "arguments"}
    base: int              # index of the gold call it varies
    reason: str            # VARIANT_FAILS or SCALED_FEATURE_FAILS
    label: str             # what was varied, for the report
    keeps_answer: bool     # the output must still verify the base call's sub-answer


@dataclass
class _Plan:
    checks: frozenset[str]
    candidate: Candidate
    turns: list[list[dict[str, Any]]]
    gold: list[dict[str, Any]]
    turn_of: list[int]
    expected: dict[str, list[str]]
    schemas: dict[str, dict[str, Any]]
    probes: list[_Probe]

    def calls(self) -> list[dict[str, Any]]:
        c = self.candidate
        return self.gold + c.invalid_calls + c.distractor_calls + [probe.call for probe in self.probes]


def _shown(call: Mapping[str, Any]) -> str:
    return f"{call['name']}({json.dumps(call['arguments'], ensure_ascii=False)[:160]})"


def tool_parameters(schema: Mapping[str, Any] | None) -> tuple[dict[str, Any], list[str]]:
    parameters = (schema or {}).get("parameters") or {}
    properties = parameters.get("properties") or {}
    return (dict(properties) if isinstance(properties, dict) else {}), list(parameters.get("required") or [])


def _types(spec: Any) -> list[str]:
    declared = spec.get("type") if isinstance(spec, dict) else None
    return [declared] if isinstance(declared, str) else [t for t in declared or [] if isinstance(t, str)]


def _has_type(value: Any, json_type: str) -> bool:
    if isinstance(value, bool) and json_type in ("integer", "number"):
        return False
    return isinstance(value, _JSON_TYPES.get(json_type, ()))


def _convert(value: Any, json_type: str) -> Any:
    """``value`` in another JSON type the schema offers, or ``_NOT_CONVERTIBLE``.

    string <- number; integer <- a string of digits, optionally after a letter prefix of up to three
    letters (``"P73"`` -> 73, the id convention of parameter-type generalisation); array <- ``[value]``.
    """
    if json_type == "array":
        return [value]
    if json_type == "string" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if json_type in ("integer", "number") and isinstance(value, str):
        match = _ID_DIGITS.fullmatch(value)
        return int(match.group(1)) if match else _NOT_CONVERTIBLE
    return _NOT_CONVERTIBLE


def variant_probes(schema: Mapping[str, Any] | None, call: Mapping[str, Any], base: int) -> list[_Probe]:
    """Harmless variants of a call: its free-text string arguments lower-cased, upper-cased, padded.

    Free text = a string value whose parameter has no ``enum`` (an enum lists exact spellings, which a
    model copies). Numbers, booleans, arrays and objects get no variants. Each variant must still
    return the base call's sub-answer.
    """
    properties, _ = tool_parameters(schema)
    arguments = dict(call["arguments"])
    strings = [name for name, value in arguments.items()
               if isinstance(value, str) and "enum" not in (properties.get(name) or {})]
    probes = []
    for label, change in (("lower-cased", str.lower), ("upper-cased", str.upper), ("padded with spaces", " {} ".format)):
        varied = {name: change(value) if name in strings else value for name, value in arguments.items()}
        if varied != arguments:
            probes.append(_Probe({"name": call["name"], "arguments": varied}, base, VARIANT_FAILS,
                                 f"{', '.join(strings)} {label}", True))
    return probes


def feature_probes(schema: Mapping[str, Any] | None, call: Mapping[str, Any], base: int) -> list[_Probe]:
    """Calls of what complexity scaling adds to a tool, varied from one gold call.

    Every other type a parameter declares (``"type": [...]``; the array form is ``[value]``) must work
    and keep the sub-answer; every optional parameter the call leaves out (booleans both ways, enums
    every value) and every other value of an enum parameter must not fail.
    """
    properties, required = tool_parameters(schema)
    arguments = dict(call["arguments"])
    probes = []

    def add(name: str, value: Any, label: str, keeps: bool) -> None:
        probes.append(_Probe({"name": call["name"], "arguments": {**arguments, name: value}}, base,
                             SCALED_FEATURE_FAILS, label, keeps))

    for name, spec in properties.items():
        spec = spec if isinstance(spec, dict) else {}
        if name in arguments:
            for json_type in _types(spec):
                converted = _convert(arguments[name], json_type)
                if not _has_type(arguments[name], json_type) and converted is not _NOT_CONVERTIBLE:
                    add(name, converted, f"{name} as {json_type}", True)
            for value in spec.get("enum") or []:
                if value != arguments[name]:
                    add(name, value, f"{name}={value!r}", False)
        elif name not in required:
            values = list(spec.get("enum") or []) or ([True, False] if _types(spec) == ["boolean"] else [])
            values += [spec["default"]] if "default" in spec and spec["default"] not in values else []
            for value in values:
                add(name, value, f"optional {name}={value!r}", False)
    return probes


def _plan(candidate: Candidate, checks: frozenset[str]) -> _Plan:
    record = candidate.record
    turns = json.loads(record["gold_calls"])
    gold = [call for turn in turns for call in turn]
    turn_of = [index for index, turn in enumerate(turns) for _ in turn]
    schemas = {tool["function"]["name"]: tool["function"] for tool in json.loads(record["tools"])}
    probes: list[_Probe] = []
    seen: set[str] = set()
    for index, call in enumerate(gold):
        if call["name"] in seen:  # the first gold call of each tool is varied
            continue
        seen.add(call["name"])
        if VARIANT_FAILS in checks:
            probes += variant_probes(schemas.get(call["name"]), call, index)
        if SCALED_FEATURE_FAILS in checks:
            probes += feature_probes(schemas.get(call["name"]), call, index)
    return _Plan(checks, candidate, turns, gold, turn_of, json.loads(record["unsolved_set"]), schemas, probes)


def _consumed(plan: _Plan, outputs: Sequence[str]) -> list[str | None]:
    """The sub-answer each gold call solves, with the reward's rules (first match, each answer once)."""
    unsolved = copy.deepcopy(plan.expected)
    consumed: list[str | None] = []
    for call, output in zip(plan.gold, outputs):
        answers = unsolved.get(call["name"], [])
        match = next((i for i, answer in enumerate(answers) if answer_verify(output, answer)), None)
        consumed.append(None if match is None else answers.pop(match))
    return consumed


def _parts(answer: str) -> list[str]:
    return [normalise_answer(part) for part in str(answer).split(", ") if normalise_answer(part)]


def _bounded(text: str, part: str) -> bool:
    """``part`` occurs in ``text`` (both normalised) as a whole value, not inside a longer word or number."""
    return re.search(rf"(?<!\w){re.escape(part)}(?!\w)", text) is not None


def _literals(source: str) -> list[str]:
    """The string and number constants of a tool's source (its table's values), docstrings left out."""
    try:
        tree = parse_python(source)
    except (SyntaxError, ValueError):
        return []
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    return [normalise_answer(str(node.value)) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and id(node) not in docstrings
            and isinstance(node.value, (str, int, float)) and not isinstance(node.value, bool)]


def accidental_match(expected: Mapping[str, Sequence[str]], final_answer: str,
                     codes: Mapping[str, str]) -> str | None:
    """Static half of ``answer_matches_by_accident``: one sub-answer inside another, or inside a value of its tool.

    The reward's check is a substring test (docs/reference.md §3), so a sub-answer (or final-answer
    part) that occurs inside a different one is solved by the other's output too, and one that occurs
    inside a longer constant of its tool's code (a table value '100' for the answer '10') is solved by
    a call that returns that value.
    """
    parts = {part for answers in expected.values() for answer in answers for part in _parts(answer)}
    parts |= set(_parts(final_answer))
    for short in sorted(parts):
        inside = sorted(other for other in parts if other != short and short in other)
        if inside:
            return f"sub-answer '{short}' occurs inside '{inside[0]}'"
    for name, answers in expected.items():
        literals = _literals(codes.get(name, ""))
        for part in (part for answer in answers for part in _parts(answer)):
            longer = next((text for text in literals if part in text and not _bounded(text, part)), None)
            if longer is not None:
                return f"sub-answer '{part}' of {name} occurs inside the value '{longer[:80]}' its code can return"
    return None


def _output_match(plan: _Plan, outputs: Sequence[str]) -> Rejection | None:
    """Dynamic half: an output of a tool verifies one of its sub-answers only inside a longer word."""
    for call, output in zip(plan.calls(), outputs):
        text = normalise_answer(str(output))
        for answer in plan.expected.get(call["name"], []):
            if answer_verify(output, answer) and not all(_bounded(text, part) for part in _parts(answer)):
                return Rejection(ACCIDENTAL_MATCH, f"sub-answer '{answer}' of {call['name']} matches only inside "
                                                   f"a longer word of {_shown(call)} -> {str(output)[:160]!r}")
    return None


def _hop_leak(plan: _Plan, outputs: Sequence[str], consumed: Sequence[str | None]) -> Rejection | None:
    """A gold output that already holds another call's sub-answer (same or later turn), not an echoed argument."""
    for i, (call, output) in enumerate(zip(plan.gold, outputs)):
        text = normalise_answer(str(output))
        echoed = normalise_answer(json.dumps(call["arguments"], ensure_ascii=False))
        for j, answer in enumerate(consumed):
            if j == i or answer is None or plan.turn_of[j] < plan.turn_of[i] or answer == consumed[i]:
                continue
            parts = _parts(answer)
            if parts and all(_bounded(text, p) for p in parts) and not all(_bounded(echoed, p) for p in parts):
                return Rejection(HOP_LEAK, f"{_shown(call)} (gold turn {plan.turn_of[i] + 1}) returns "
                                           f"{str(output)[:160]!r}, which already holds '{answer}', the sub-answer of "
                                           f"{_shown(plan.gold[j])} (gold turn {plan.turn_of[j] + 1})")
    return None


def blamed(call: Mapping[str, Any], schema: Mapping[str, Any] | None,
           valid_calls: Sequence[Mapping[str, Any]]) -> list[str]:
    """What an invalid call gets wrong, as words its error should name: parameters and bad values.

    Missing required parameters, undeclared ones, values outside an enum or of an undeclared type,
    and values no valid call of the tool (``valid_calls``: its gold or distractor calls) uses.
    """
    properties, required = tool_parameters(schema)
    arguments = call.get("arguments") or {}
    words = [name for name in required if name not in arguments]
    for name, value in arguments.items():
        spec = properties.get(name)
        wrong = (spec is None or ("enum" in spec and value not in spec["enum"])
                 or (_types(spec) and not any(_has_type(value, t) for t in _types(spec)))
                 or (valid_calls and all((c.get("arguments") or {}).get(name) != value for c in valid_calls)))
        if wrong:
            words.append(name)
            if spec is not None:
                words += dict.fromkeys([str(value), repr(value), json.dumps(value, ensure_ascii=False)])
    return list(dict.fromkeys(words))


def _informative(output: str, name: str, words: Sequence[str]) -> bool:
    message = str(output)[len(format_tool_error(name, "")):].lower()
    return not words or any(_bounded(message, word.lower()) or (len(word) > 3 and word.lower() in message)
                            for word in words)


def _invalid_and_distractors(plan: _Plan, invalid_outputs: Sequence[str],
                             distractor_outputs: Sequence[str]) -> Rejection | None:
    candidate = plan.candidate
    for call, output in zip(candidate.invalid_calls, invalid_outputs):
        if not is_error(output, call["name"]):
            return Rejection(INVALID_CALL_ACCEPTED, f"{_shown(call)} -> {str(output)[:160]!r}")
        if any(answer_verify(output, answer) for answer in plan.expected.get(call["name"], [])):
            return Rejection(INVALID_CALL_LEAKS, f"{_shown(call)} -> {str(output)[:160]!r}")
        valid = [c for c in plan.gold + candidate.distractor_calls if c["name"] == call["name"]]
        words = blamed(call, plan.schemas.get(call["name"]), valid)
        if ERROR_UNINFORMATIVE in plan.checks and not _informative(output, call["name"], words):
            return Rejection(ERROR_UNINFORMATIVE, f"{_shown(call)} -> {str(output)[:160]!r} names none of "
                                                  f"{', '.join(repr(w) for w in words[:6])}")
    all_answers = [answer for answers in plan.expected.values() for answer in answers]
    for call, output in zip(candidate.distractor_calls, distractor_outputs):
        if is_error(output, call["name"]):
            return Rejection(DISTRACTOR_BROKEN, f"{_shown(call)} -> {str(output)[:160]!r}")
        echoed = json.dumps(call["arguments"], ensure_ascii=False)
        leaked = [a for a in all_answers if answer_verify(output, a) and not answer_verify(echoed, a)]
        if leaked:
            return Rejection(DISTRACTOR_ANSWERS, f"{_shown(call)} -> {str(output)[:160]!r} holds '{leaked[0]}'")
    return None


def _probes(plan: _Plan, outputs: Sequence[str], consumed: Sequence[str | None]) -> Rejection | None:
    for probe, output in zip(plan.probes, outputs):
        answer = consumed[probe.base]
        failed = is_error(output, probe.call["name"])
        if failed or (probe.keeps_answer and answer is not None and not answer_verify(output, answer)):
            lost = "fails" if failed else f"loses the sub-answer '{answer}'"
            return Rejection(probe.reason, f"{probe.label}: {_shown(probe.call)} {lost}: {str(output)[:160]!r} "
                                           f"(the gold call {_shown(plan.gold[probe.base])} works)")
    return None


def _judge_candidate(plan: _Plan, outputs: Sequence[str], again: Sequence[str]) -> Rejection | None:
    candidate = plan.candidate
    record = candidate.record
    n_gold, n_invalid = len(plan.gold), len(candidate.invalid_calls)
    n_distractor = len(candidate.distractor_calls)
    gold_outputs = list(outputs[:n_gold])
    for call, first, second in zip(plan.gold, gold_outputs, again):
        if NONDETERMINISTIC in plan.checks and first != second:
            return Rejection(NONDETERMINISTIC, f"{_shown(call)} returned {first[:120]!r}, then {second[:120]!r}")
    reason, detail = judge_gold(plan.turns, gold_outputs, plan.expected)  # gold errors, timeouts, unsolved
    if reason is not None:
        return Rejection(reason, detail)
    missing = [part for part in record["answer"].split(", ")
               if not any(answer_verify(output, part) for output in gold_outputs)]
    if missing:
        return Rejection(ANSWER_UNREACHABLE, f"final-answer part '{missing[0]}' occurs in no gold output")
    static = accidental_match(plan.expected, record["answer"], json.loads(record["codes"]))
    if static is not None and ACCIDENTAL_MATCH in plan.checks:
        return Rejection(ACCIDENTAL_MATCH, static)
    consumed = _consumed(plan, gold_outputs)
    return ((_output_match(plan, outputs) if ACCIDENTAL_MATCH in plan.checks else None)
            or (_hop_leak(plan, gold_outputs, consumed) if HOP_LEAK in plan.checks else None)
            or _invalid_and_distractors(plan, outputs[n_gold:n_gold + n_invalid],
                                        outputs[n_gold + n_invalid:n_gold + n_invalid + n_distractor])
            or _probes(plan, outputs[n_gold + n_invalid + n_distractor:], consumed))


def gate_candidates(
    candidates: Sequence[Candidate],
    timeout: float,
    run: Callable[[list[tuple[dict[str, str], list[dict[str, Any]]]], float], list[list[str]]] | None = None,
    checks: Sequence[str] | None = None,
) -> list[Rejection | None]:
    """Probe candidates in the sandbox; ``None`` for a good one, else the :class:`Rejection`.

    A good environment (each check's reason in :data:`REASONS`, first failure wins): its gold calls
    return the same outputs when run twice; they succeed and, applied turn by turn with the reward's
    rules, solve every sub-answer; each part of the final answer occurs in some gold output; no
    sub-answer matches by accident (:func:`accidental_match`, and no output of a tool verifies one of
    its sub-answers only inside a longer word); no gold output holds the sub-answer of another call of
    the same or a later turn (other than an echoed argument); each invalid probe fails, without that
    tool's sub-answer, naming a parameter or value at fault (:func:`blamed`); each distractor call
    succeeds without a sub-answer (other than the ids it was called with); and for the first gold call
    of each tool, the :func:`variant_probes` and :func:`feature_probes` work.
    ``run`` executes ``[(codes, openai_calls)]`` batches (default: the process-wide sandbox);
    ``checks`` names the :data:`PROBE_CHECKS` to make (default: all).
    """
    chosen = frozenset(PROBE_CHECKS if checks is None else checks)
    unknown = sorted(chosen - set(PROBE_CHECKS))
    if unknown:
        raise ValueError(f"gate checks: unknown {unknown}; valid: {list(PROBE_CHECKS)}")
    if run is None:
        from ftrl.envs.sandbox import get_sandbox

        def run(jobs: list[tuple[dict[str, str], list[dict[str, Any]]]], limit: float) -> list[list[str]]:
            return get_sandbox().map_calls(jobs, limit)

    plans = [_plan(candidate, chosen) for candidate in candidates]
    jobs = []
    for plan in plans:
        codes = json.loads(plan.candidate.record["codes"])
        jobs.append((codes, [gold_call(call, index) for index, call in enumerate(plan.calls())]))
    for plan in plans:  # the gold calls again, as a separate batch: the determinism check
        jobs.append((json.loads(plan.candidate.record["codes"]),
                     [gold_call(call, index) for index, call in enumerate(plan.gold)]))
    results = run(jobs, timeout) if jobs else []
    return [_judge_candidate(plan, results[index], results[len(plans) + index]) for index, plan in enumerate(plans)]
