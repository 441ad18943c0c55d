"""When a tool output solves a sub-question: the reference's ``answer_verify`` and its bookkeeping.

Shared by the environment gates (here, below the reward in the import order), the reward, snapshot
collection and evaluation, so every part of the system agrees on what "solved" means.

    python -c "from ftrl.envs.verify import answer_verify; print(answer_verify({'a': 'Paris'}, 'paris'))"
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from ftrl.types import ToolCall


def answer_verify(predict: Any, golden: str) -> bool:
    """True if every ", "-separated part of ``golden`` occurs in ``predict`` (reference rules).

    Dict/list predicts are JSON-dumped (``ensure_ascii=False``), anything else non-string goes
    through ``str()``. Both sides are lower-cased and lose their commas, so "1,234" matches "1234".
    An empty golden part matches everything.
    """
    if not isinstance(golden, str):
        raise TypeError(f"golden answer must be a string, got {type(golden).__name__}: {golden!r}")
    # Exact type check as the reference: dict/list subclasses go through str().
    if type(predict) in (dict, list):
        predict = json.dumps(predict, ensure_ascii=False)
    elif type(predict) is not str:
        predict = str(predict)
    normalised = normalise_answer(predict)
    return all(normalise_answer(part) in normalised for part in golden.split(", "))


def normalise_answer(text: str) -> str:
    """The reference's comparison form: lower-cased, commas dropped, outer whitespace stripped."""
    return text.lower().replace(",", "").strip()


def apply_tool_results(
    tool_calls: Sequence[ToolCall], outputs: Sequence[Any], unsolved_set: dict[str, list[str]]
) -> int:
    """Consume, per (call, output) pair, the first sub-answer of that tool the output verifies.

    Mutates ``unsolved_set`` (each expected answer is solved once) and returns how many were
    solved. A call whose name is not a string (possible under compat=ftrl) solves nothing.
    """
    solved = 0
    for call, output in zip(tool_calls, outputs):
        name = call.get("function", {}).get("name")
        answers = unsolved_set.get(name, []) if isinstance(name, str) else []
        for index, expected in enumerate(answers):
            if answer_verify(output, expected):
                del answers[index]
                solved += 1
                break
    return solved
