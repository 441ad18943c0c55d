"""Quality gates of the LLM builder: deployed tool sets become reference records only if they work.

A :class:`~ftrl.builder.records.Deployed` item becomes a reference record (docs/reference.md §2) with the
``gold_calls`` extra field exactly as the procedural builder writes it (a JSON list of turns, each a
list of ``{"name", "arguments"}``; turn k holds the sub-questions at dependency depth k, so parallel
hops share a turn). Then, in order:

1. ``invalid_record``: :func:`ftrl.envs.io.validate_record` (schema; every ``unsolved_set`` key is in
   ``tools`` and ``codes``; gold calls name known tools);
2. the procedural builder's sandbox gate (:func:`ftrl.envs.procedural.gate`, shared, not copied):
   the gold calls run without error and, applied turn by turn with the reward's rules, solve every
   sub-answer (``gold_call_error``, ``gold_leaves_unsolved``) and reach the final answer
   (``answer_not_in_outputs``); invalid probes come back as errors that do not leak the answer
   (``invalid_call_accepted``, ``invalid_call_returns_answer``); distractors run and answer nothing
   (``distractor_error``, ``distractor_returns_answer``). The invalid probes are derived from the
   schemas: the first required argument left out, an unknown value for the first required string
   argument, or (a tool without required arguments) an undeclared argument;
3. optionally (``envs.llm.reference_check``), ``reference_model_failed``: a reference model plays
   the environment with the collector's episode loop and must solve every sub-answer within
   ``reference_max_turns`` turns.

    python -m pytest tests/test_env_builder.py -q -k gate
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from typing import Any

from ftrl.builder.records import Deployed, StageFailure, tool_name
from ftrl.envs import procedural
from ftrl.envs.io import RecordError, validate_record
from ftrl.types import make_tool_call

INVALID_RECORD = "invalid_record"
REFERENCE_FAILED = "reference_model_failed"
UNKNOWN_VALUE = "zz-unknown-value-0"


def gold_turns(item: Deployed) -> list[list[dict[str, Any]]]:
    scenario = item.toolset.scenario
    levels = scenario.levels()
    turns: list[list[dict[str, Any]]] = [[] for _ in range(max(levels.values()) + 1)]
    for call in item.toolset.calls:
        turns[levels[call.sub_question_id]].append(call.as_call())
    return turns


def to_record(item: Deployed, split: str) -> dict[str, Any]:
    """The reference record of a deployed environment (+ ``gold_calls``), field order as procedural."""
    toolset = item.toolset
    scenario = toolset.scenario
    unsolved: dict[str, list[str]] = {}
    for call in toolset.calls:
        unsolved.setdefault(call.name, []).append(scenario.sub_question(call.sub_question_id).answer)
    return {
        "messages": [{"role": "user", "content": scenario.task.question}],
        "tools": json.dumps(toolset.all_tools, ensure_ascii=False),
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


def gate_envs(
    items: Sequence[Deployed],
    splits: Mapping[str, str],
    timeout: float,
) -> tuple[list[tuple[Deployed, dict[str, Any]]], list[StageFailure]]:
    """Records that pass every check, and a failure (with the reason) for each one that does not."""
    failures: list[StageFailure] = []
    candidates: list[tuple[Deployed, procedural.Candidate]] = []
    for item in items:
        task = item.toolset.scenario.task
        record = to_record(item, splits[task.task_id])
        try:
            validate_record(record, f"task {task.task_id}")
        except RecordError as error:
            failures.append(StageFailure(task.task_id, task.question, "gate", INVALID_RECORD, str(error)))
            continue
        candidates.append(
            (
                item,
                procedural.Candidate(
                    record,
                    (task.task_id,),
                    invalid_probes(item),
                    copy.deepcopy(item.toolset.distractor_calls),
                ),
            )
        )
    verdicts = procedural.gate([candidate for _, candidate in candidates], timeout) if candidates else []
    kept = []
    for (item, candidate), verdict in zip(candidates, verdicts):
        task = item.toolset.scenario.task
        if verdict is None:
            kept.append((item, candidate.record))
        else:
            failures.append(
                StageFailure(
                    task.task_id, task.question, "gate", verdict, _evidence(candidate, verdict, timeout)
                )
            )
    return kept, failures


def _evidence(candidate: procedural.Candidate, verdict: str, timeout: float) -> str:
    """The outputs behind a rejection, for the report (the gate itself only returns the reason)."""
    from ftrl.envs.sandbox import get_sandbox

    record = candidate.record
    codes = json.loads(record["codes"])
    if verdict in (procedural.GOLD_CALL_ERROR, procedural.TOOL_TIMEOUT, procedural.GOLD_UNSOLVED,
                   procedural.ANSWER_UNREACHABLE):
        calls = [call for turn in json.loads(record["gold_calls"]) for call in turn]
        label = "gold"
    elif verdict in (procedural.INVALID_CALL_ACCEPTED, procedural.INVALID_CALL_LEAKS):
        calls, label = candidate.invalid_calls, "invalid probe"
    else:
        calls, label = candidate.distractor_calls, "distractor"
    openai_calls = [make_tool_call(c["name"], c["arguments"], f"e{i}") for i, c in enumerate(calls)]
    outputs = get_sandbox().map_calls([(codes, openai_calls)], timeout)[0]
    shown = "; ".join(
        f"{label} {c['name']}({json.dumps(c['arguments'], ensure_ascii=False)}) -> {o[:200]!r}"
        for c, o in zip(calls, outputs)
    )
    return f"expected {json.loads(record['unsolved_set'])}; {shown}"


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
