"""Seed tasks: reading the user's question file, stable task ids, near-duplicate removal, split assignment.

A seed file is JSON lines, one task per line: ``{"question": ...}`` with optional ``"id"``,
``"split"`` (train/test), ``"scenario"`` (a scenario type to build) and ``"answer"`` (a known final
answer the decomposition must contain). Reference records (``messages`` + ``answer``) are accepted
too: their first user message is the question.

Near duplicates are judged on normalised text (lower case, punctuation dropped, whitespace
collapsed) with ``difflib``'s ratio; the first of two questions at least ``threshold`` similar is
kept. Tasks without a split go to test when a hash of their id falls below ``test_fraction``, so a
task keeps its split when other seeds are added or removed.

    python -c "from ftrl.builder.seeds import similarity; print(similarity('Hi there?', 'hi there'))"
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path

from ftrl.builder.records import SeedTask, StageFailure
from ftrl.types import SCENARIOS, SPLITS

DUPLICATE_QUESTION = "duplicate_question"


def normalise_question(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).replace("_", " ").split())


def task_id_for(question: str) -> str:
    return hashlib.sha256(normalise_question(question).encode("utf-8")).hexdigest()[:12]


def similarity(a: str, b: str) -> float:
    return difflib.SequenceMatcher(None, normalise_question(a), normalise_question(b), autojunk=False).ratio()


def read_seed_file(path: str | Path) -> list[SeedTask]:
    """Seed tasks of a JSONL file; errors name the file, the line and the field."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"envs.llm.seed_file: no such file '{path}'")
    tasks = []
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not valid JSON: {error}") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object with a 'question'")  # noqa: TRY004 (bad data)
        question = row.get("question")
        if question is None and isinstance(row.get("messages"), list):
            question = next((m.get("content") for m in row["messages"] if m.get("role") == "user"), None)
        if not isinstance(question, str) or not question.strip():
            raise ValueError(
                f"{where}: needs a non-empty 'question' (or reference 'messages' with a user turn)"
            )
        split = row.get("split")
        if split is not None and split not in SPLITS:
            raise ValueError(f"{where}: 'split' is {split!r}; valid: {list(SPLITS)}")
        scenario = row.get("scenario")
        if scenario is not None and scenario not in SCENARIOS:
            raise ValueError(f"{where}: 'scenario' is {scenario!r}; valid: {list(SCENARIOS)}")
        answer = row.get("answer")
        tasks.append(
            SeedTask(
                task_id=str(row.get("id") or task_id_for(question)),
                question=question.strip(),
                origin=f"file:{path}:{line_number}",
                split=split,
                scenario=scenario,
                reference_answer=str(answer) if answer not in (None, "") else None,
            )
        )
    ids = [task.task_id for task in tasks]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise ValueError(f"{path}: task ids must be unique; repeated: {repeated[:10]}")
    return tasks


def remove_near_duplicates(
    tasks: Sequence[SeedTask], threshold: float
) -> tuple[list[SeedTask], list[StageFailure]]:
    """Keep the first of every group of questions at least ``threshold`` similar."""
    kept: list[SeedTask] = []
    normalised: list[str] = []
    failures = []
    for task in tasks:
        text = normalise_question(task.question)
        match = None
        for other, other_text in zip(kept, normalised):
            matcher = difflib.SequenceMatcher(None, text, other_text, autojunk=False)
            # The cheap upper bounds rule out most pairs before the quadratic ratio.
            if (
                matcher.real_quick_ratio() >= threshold
                and matcher.quick_ratio() >= threshold
                and matcher.ratio() >= threshold
            ):
                match = other
                break
        if match is None:
            kept.append(task)
            normalised.append(text)
        else:
            failures.append(
                StageFailure(
                    task.task_id,
                    task.question,
                    "dedup",
                    DUPLICATE_QUESTION,
                    f"{similarity(task.question, match.question):.2f} similar to task "
                    f"{match.task_id}: {match.question!r}",
                )
            )
    return kept, failures


def assign_split(task: SeedTask, test_fraction: float, seed: int) -> str:
    if task.split is not None:
        return task.split
    digest = hashlib.sha256(f"{seed}:{task.task_id}".encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2**64 < test_fraction else "train"
