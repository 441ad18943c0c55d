"""Quality gates of the LLM builder: deployed tool sets become reference records only if they work.

A :class:`~ftrl.builder.records.Deployed` item becomes a reference record (docs/reference.md §2) with the
``gold_calls`` extra field exactly as the procedural builder writes it (a JSON list of turns, each a
list of ``{"name", "arguments"}``; turn k holds the sub-questions at dependency depth k, so parallel
hops share a turn); its tools are listed in an order seeded by the task (answering tools and
distractors mixed). Then, in order:

1. ``invalid_record``: :func:`ftrl.envs.io.validate_record` (schema; every ``unsolved_set`` key is in
   ``tools`` and ``codes``; gold calls name known tools); ``gold_answer_mismatch``: a task with a gold
   answer (QA seeds) whose record's final answer is not exactly it;
2. the shared build-time gate of both builders (:func:`ftrl.envs.gate.gate_candidates`, not copied):
   the gold calls run deterministically without error and, applied turn by turn with the reward's
   rules, solve every sub-answer and reach the final answer (so a gold answer must come out of the
   tools); no accidental or cross-hop matches; invalid probes fail with an informative error that
   does not leak the answer; distractors run and answer nothing; harmless variants and the
   schema's scaled features work. The invalid probes are derived here from the schemas: the first
   required argument left out, an unknown value for the first required string argument, or (a
   tool without required arguments) an undeclared argument;
3. the scaled features of stage 4 (``ftrl.builder.scaling``) on every gold call, including gold
   values in alternative types the LLM supplied: ``scaled_call_error`` when a probe returns an
   error, ``scaled_call_wrong_answer`` when one that asks the same question does not return the
   sub-answer. Failures of steps 2-3 that concern a scaled feature or a distractor name the
   strategy (``StageFailure.strategies``), for the build report's per-strategy counts;
4. optionally (``envs.llm.reference_check``), ``reference_model_failed``: a reference model plays
   the environment with the collector's episode loop and must solve every sub-answer within
   ``reference_max_turns`` turns.

    python -m pytest tests/test_env_builder.py -q -k gate
"""

from __future__ import annotations

import copy
import json
import random
import re
from collections.abc import Mapping, Sequence
from typing import Any

from ftrl.builder.records import Deployed, StageFailure, tool_name
from ftrl.envs import gate as env_gate
from ftrl.envs.io import RecordError, validate_record
from ftrl.envs.verify import answer_verify
from ftrl.types import make_tool_call

INVALID_RECORD = "invalid_record"
GOLD_ANSWER_MISMATCH = "gold_answer_mismatch"
SCALED_CALL_ERROR = "scaled_call_error"
SCALED_CALL_WRONG = "scaled_call_wrong_answer"
REFERENCE_FAILED = "reference_model_failed"
UNKNOWN_VALUE = "zz-unknown-value-0"
# Gate verdicts that blame the distractor tools (the "distractors" scaling strategy).
DISTRACTOR_REASONS = (env_gate.DISTRACTOR_BROKEN, env_gate.DISTRACTOR_ANSWERS)


def gold_turns(item: Deployed) -> list[list[dict[str, Any]]]:
    scenario = item.toolset.scenario
    levels = scenario.levels()
    turns: list[list[dict[str, Any]]] = [[] for _ in range(max(levels.values()) + 1)]
    for call in item.toolset.calls:
        turns[levels[call.sub_question_id]].append(call.as_call())
    return turns


def shuffled_tools(item: Deployed) -> list[dict[str, Any]]:
    """Answering tools and distractors in an order seeded by the task: position says nothing about a tool."""
    tools = list(item.toolset.all_tools)
    random.Random(f"tool-order:{item.toolset.scenario.task.task_id}").shuffle(tools)
    return tools


def to_record(item: Deployed, split: str) -> dict[str, Any]:
    """The reference record of a deployed environment (+ ``gold_calls``), field order as procedural."""
    toolset = item.toolset
    scenario = toolset.scenario
    unsolved: dict[str, list[str]] = {}
    for call in toolset.calls:
        unsolved.setdefault(call.name, []).append(scenario.sub_question(call.sub_question_id).answer)
    return {
        "messages": [{"role": "user", "content": scenario.task.question}],
        "tools": json.dumps(shuffled_tools(item), ensure_ascii=False),
        "codes": json.dumps(item.codes, ensure_ascii=False),
        "unsolved_set": json.dumps(unsolved, ensure_ascii=False),
        "solve_rate": 0.0,
        "answer": scenario.final_answer,
        "data_source": scenario.scenario_type,
        "split": split,
        "gold_calls": json.dumps(gold_turns(item), ensure_ascii=False),
    }


def invalid_probes(item: Deployed) -> list[dict[str, Any]]:
    """Calls every answering tool must reject (derived from its schema and its first gold call)."""
    probes = []
    first_call: dict[str, dict[str, Any]] = {}
    for call in item.toolset.calls:
        first_call.setdefault(call.name, call.arguments)
    for tool in item.toolset.tools:
        name = tool_name(tool)
        if name not in first_call:
            continue
        arguments = first_call[name]
        parameters = tool["function"].get("parameters", {})
        required = [p for p in parameters.get("required", []) if p in arguments]
        if not required:
            probes.append(
                {"name": name, "arguments": {**copy.deepcopy(arguments), "zz_undeclared_argument": 1}}
            )
            continue
        probes.append({"name": name, "arguments": {k: v for k, v in arguments.items() if k != required[0]}})
        for param in required:
            declared = parameters.get("properties", {}).get(param, {}).get("type")
            types = [declared] if isinstance(declared, str) else (declared or [])
            if "string" in types and isinstance(arguments[param], str):
                probes.append({"name": name, "arguments": {**copy.deepcopy(arguments), param: UNKNOWN_VALUE}})
                break
    return probes


def _static_failure(item: Deployed, record: dict[str, Any]) -> StageFailure | None:
    task = item.toolset.scenario.task
    try:
        validate_record(record, f"task {task.task_id}")
    except RecordError as error:
        return StageFailure(task.task_id, task.question, "gate", INVALID_RECORD, str(error))
    if task.reference_answer is not None and record["answer"] != task.reference_answer:
        return StageFailure(
            task.task_id, task.question, "gate", GOLD_ANSWER_MISMATCH,
            f"the environment's final answer {record['answer']!r} is not the gold answer {task.reference_answer!r}",
        )
    return None


def probe_failures(kept: Sequence[tuple[Deployed, dict[str, Any]]], timeout: float) -> list[StageFailure | None]:
    """Run every scaled-feature probe of each environment; the first failing one is its verdict."""
    from ftrl.envs.sandbox import get_sandbox

    jobs = [
        (json.loads(record["codes"]),
         [make_tool_call(p.name, p.arguments, f"probe_{i}") for i, p in enumerate(item.toolset.probes)])
        for item, record in kept
    ]
    outputs = get_sandbox().map_calls(jobs, timeout) if any(calls for _, calls in jobs) else [[] for _ in jobs]
    verdicts: list[StageFailure | None] = []
    for (item, _), results in zip(kept, outputs):
        scenario = item.toolset.scenario
        verdict = None
        for probe, output in zip(item.toolset.probes, results):
            answer = scenario.sub_question(probe.sub_question_id).answer
            if env_gate.is_error(output, probe.name):
                reason = SCALED_CALL_ERROR
            elif probe.expect_answer and not answer_verify(output, answer):
                reason = SCALED_CALL_WRONG
            else:
                continue
            shown = f"{probe.name}({json.dumps(probe.arguments, ensure_ascii=False)}) -> {str(output)[:200]!r}"
            expected = f"; expected the sub-answer {answer!r}" if reason == SCALED_CALL_WRONG else ""
            verdict = StageFailure(
                scenario.task.task_id, scenario.task.question, "gate", reason,
                f"{probe.strategy}: {probe.feature}: {shown}{expected}", strategies=[probe.strategy],
            )
            break
        verdicts.append(verdict)
    return verdicts


def _blamed(item: Deployed, rejection: Any) -> list[str]:
    """The scaling strategy a shared-gate rejection concerns: a distractor, or a scaled parameter."""
    if rejection.reason in DISTRACTOR_REASONS:
        return ["distractors"]
    if rejection.reason != env_gate.SCALED_FEATURE_FAILS:
        return []
    # The detail opens with what was varied ("city as array", "optional unit='c'") and shows the call.
    param = re.match(r"\s*(?:optional )?(\w+)", rejection.detail)
    tool = re.search(r": (\w+)\(", rejection.detail)
    found = item.toolset.features.get(f"{tool.group(1)}.{param.group(1)}") if param and tool else None
    return [found] if found else []


def _candidate(item: Deployed, record: dict[str, Any]) -> Any:
    toolset = item.toolset
    scaling: dict[str, Any] = {s: True for s in toolset.strategies if s != "distractors"}
    scaling["distractors"] = len(toolset.distractors)
    return env_gate.Candidate(
        record, (toolset.scenario.task.task_id,), invalid_probes(item), copy.deepcopy(toolset.distractor_calls),
        scaling=scaling,
    )


def gate_envs(
    items: Sequence[Deployed],
    splits: Mapping[str, str],
    timeout: float,
) -> tuple[list[tuple[Deployed, dict[str, Any]]], list[StageFailure]]:
    """Records that pass every check, and a failure (with the reason) for each one that does not."""
    failures: list[StageFailure] = []
    candidates: list[tuple[Deployed, Any]] = []
    for item in items:
        record = to_record(item, splits[item.toolset.scenario.task.task_id])
        failure = _static_failure(item, record)
        if failure is not None:
            failures.append(failure)
        else:
            candidates.append((item, _candidate(item, record)))
    verdicts = env_gate.gate_candidates([c for _, c in candidates], timeout) if candidates else []
    passed = []
    for (item, candidate), rejection in zip(candidates, verdicts):
        task = item.toolset.scenario.task
        if rejection is None:
            passed.append((item, candidate.record))
        else:
            failures.append(StageFailure(task.task_id, task.question, "gate", rejection.reason, rejection.detail,
                                         strategies=_blamed(item, rejection)))
    kept = []
    for pair, failure in zip(passed, probe_failures(passed, timeout) if passed else []):
        if failure is None:
            kept.append(pair)
        else:
            failures.append(failure)
    order = {item.toolset.scenario.task.task_id: index for index, item in enumerate(items)}
    failures.sort(key=lambda f: order.get(f.task_id, len(order)))
    return kept, failures


def reference_check(
    kept: Sequence[tuple[Deployed, dict[str, Any]]], engine: Any, max_turns: int, timeout: float
) -> list[StageFailure | None]:
    """Play each record with ``engine`` (greedy); a record not fully solved within ``max_turns`` fails."""
    from ftrl.collect import Episode, run_episodes
    from ftrl.envs.executor import StatefulExecutor
    from ftrl.llm.engines.base import SamplingParams
    from ftrl.llm.parsers import get_parser

    episodes: dict[int, Episode] = {}
    run_episodes(
        engine,
        [(index, record) for index, (_, record) in enumerate(kept)],
        params=SamplingParams(temperature=0.0, max_new_tokens=1024),
        max_turns=max_turns,
        parser=get_parser("qwen"),
        execute=StatefulExecutor(timeout=timeout),
        on_done=lambda episode: episodes.__setitem__(episode.index, episode),
        progress=False,
        desc="reference check",
    )
    verdicts: list[StageFailure | None] = []
    for index, (item, _) in enumerate(kept):
        episode = episodes[index]
        task = item.toolset.scenario.task
        if episode.solved == episode.total:
            verdicts.append(None)
        else:
            verdicts.append(
                StageFailure(
                    task.task_id,
                    task.question,
                    "reference",
                    REFERENCE_FAILED,
                    f"solved {episode.solved}/{episode.total} sub-answers with {episode.calls} "
                    f"call(s) in {episode.turns} turn(s) (limit {max_turns})",
                )
            )
    return verdicts
