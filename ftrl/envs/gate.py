"""The environment gate every source's records pass in ``build_envs``, whatever built them.

The procedural generator and the LLM builder gate their candidates while they build them
(:func:`ftrl.envs.procedural.gate`, which judges gold calls with :func:`judge_gold` below); a
reference file (``envs=ftrl_files``), a stored set or an imported family gets the same checks
here, after loading, so no environment reaches collection, the warm start or evaluation unchecked.
Per record, in order (the first failure is the reason it is dropped):

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

    python -m pytest tests/test_env_gate.py -q
"""

from __future__ import annotations

import ast
import copy
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ftrl.envs.io import RecordError, check_stored_strings, validate_record
from ftrl.envs.verify import apply_tool_results
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
            tree = ast.parse(source, filename=f"codes['{name}']")
            compile(tree, f"codes['{name}']", "exec")
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
