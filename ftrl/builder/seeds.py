"""Seed tasks: the user's question file, QA datasets with gold answers, stable ids, near-duplicates, splits.

A seed file (``envs.llm.seed_file``) is JSON lines, one task per line: ``{"question": ...}`` with
optional ``"id"``, ``"split"`` (train/test), ``"scenario"`` (a scenario type to build) and
``"answer"`` (the gold final answer). Reference records (``messages`` + ``answer``) are accepted
too: their first user message is the question.

A seed source (``envs.llm.seed_source``) adapts a QA dataset with gold answers, the field names
configurable (dotted paths into nested rows; a list gives its first element): ``kind=jsonl`` reads
a local JSONL file, ``kind=datasets`` anything ``datasets.load_dataset`` reads (a local data file or
dataset directory; a hub id where the machine has network). Every row's answer becomes the task's
gold answer: the environment's final answer is exactly it, and its tools' outputs are built around
it. A row without a question or answer is reported (stage ``seeds``), not used.

Near duplicates are judged on normalised text (lower case, punctuation dropped, whitespace
collapsed) with ``difflib``'s ratio; the first of two questions at least ``threshold`` similar is
kept. Tasks without a split go to test when a hash of their id falls below ``test_fraction``, so a
task keeps its split when other seeds are added or removed.

    python -c "from ftrl.builder.seeds import similarity; print(similarity('Hi there?', 'hi there'))"
    python -m pytest tests/test_builder_seeds.py -q
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ftrl.builder.records import SeedTask, StageFailure
from ftrl.config import SeedSourceConfig
from ftrl.types import SCENARIOS, SPLITS

DUPLICATE_QUESTION = "duplicate_question"
MISSING_QUESTION = "missing_question"
MISSING_GOLD_ANSWER = "missing_gold_answer"
SOURCE_KEY = "envs.llm.seed_source"
# Local data files datasets.load_dataset reads by extension (its packaged builders).
DATASET_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv", ".arrow": "arrow"}


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


# ------------------------------------------------------------------------------------ seed sources
_MISSING = object()


def field_value(row: Mapping[str, Any], path: str) -> Any:
    """``row[a][b]`` for the dotted ``path`` ``a.b``; a list on the way (or at the end) gives its first element."""
    value: Any = row
    for part in path.split("."):
        if isinstance(value, list):
            value = value[0] if value else None
        if not isinstance(value, Mapping) or part not in value:
            return _MISSING
        value = value[part]
    if isinstance(value, list):
        value = value[0] if value else None
    return value


def _as_text(value: Any, where: str, key: str, path: str) -> str | None:
    """A scalar field as text (None when empty); an object is a configuration mistake."""
    if value is None or isinstance(value, list):
        return None
    if isinstance(value, Mapping):
        raise ValueError(  # noqa: TRY004 (a configuration mistake, reported like the other seed errors)
            f"{where}: {SOURCE_KEY}.{key}={path!r} is an object with fields {sorted(value)[:8]}; name one "
            f"inside it, e.g. {SOURCE_KEY}.{key}={path}.{next(iter(value), 'value')}"
        )
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    return text or None


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Mapping[str, Any]]]:
    if not path.is_file():
        raise FileNotFoundError(f"{SOURCE_KEY}.path: no such file '{path}'")
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not valid JSON: {error}") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object")  # noqa: TRY004 (bad data, not a bad call)
        yield where, row


def _looks_local(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~")) or Path(value).expanduser().exists()


def load_dataset_rows(source: SeedSourceConfig) -> Any:
    """The rows of ``source`` read with ``datasets`` (a local file or directory, else a dataset id)."""
    try:
        import datasets
    except ImportError as error:
        raise ValueError(f"{SOURCE_KEY}.kind=datasets needs the 'datasets' package (pip install datasets)") from error
    assert source.path is not None
    path = Path(source.path).expanduser()
    where = f"{SOURCE_KEY}.path={source.path!r} (split {source.split!r})"
    try:
        if path.is_file():
            builder = DATASET_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise ValueError(f"cannot read '{path.name}'; data files datasets reads: {sorted(DATASET_BUILDERS)}")
            return datasets.load_dataset(builder, data_files={source.split: str(path)}, split=source.split)
        if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
            stored = datasets.load_from_disk(str(path))  # a save_to_disk directory
            if isinstance(stored, datasets.DatasetDict):
                if source.split not in stored:
                    raise ValueError(f"no split {source.split!r}; splits: {sorted(stored)}")
                return stored[source.split]
            return stored
        if not path.is_dir() and _looks_local(source.path):
            raise FileNotFoundError(f"{SOURCE_KEY}.path: no such file or directory '{path}'")
        return datasets.load_dataset(str(path) if path.is_dir() else source.path, source.name, split=source.split)
    except FileNotFoundError:
        raise
    except Exception as error:  # datasets raises many kinds; say which key and input failed
        raise ValueError(f"{where}: datasets could not read it: {type(error).__name__}: {error}") from error


def _source_rows(source: SeedSourceConfig) -> Iterator[tuple[str, Mapping[str, Any]]]:
    assert source.path is not None
    if source.kind == "jsonl":
        yield from _jsonl_rows(Path(source.path).expanduser())
        return
    for index, row in enumerate(load_dataset_rows(source)):
        yield f"{source.path}[{source.split}] row {index}", row


def _required(row: Mapping[str, Any], where: str, key: str, path: str) -> str | None:
    value = field_value(row, path)
    if value is _MISSING:
        raise ValueError(
            f"{where}: no field {path!r} ({SOURCE_KEY}.{key}); the row has {sorted(row)[:20]}"
        )
    return _as_text(value, where, key, path)


def read_seed_source(source: SeedSourceConfig) -> tuple[list[SeedTask], list[StageFailure]]:
    """Seed tasks with gold answers from a QA dataset, and a failure for each row that cannot be one."""
    tasks: list[SeedTask] = []
    failures: list[StageFailure] = []
    seen: set[str] = set()
    for where, row in _source_rows(source):
        question = _required(row, where, "question_field", source.question_field)
        answer = _required(row, where, "answer_field", source.answer_field)
        raw_id = field_value(row, source.id_field) if source.id_field else _MISSING
        row_id = None if raw_id is _MISSING else _as_text(raw_id, where, "id_field", str(source.id_field))
        task_id = row_id or task_id_for(question or where)
        if question is None or answer is None:
            reason, name = (MISSING_QUESTION, source.question_field) if question is None else (
                MISSING_GOLD_ANSWER, source.answer_field)
            failures.append(StageFailure(task_id, question or "", "seeds", reason, f"{where}: {name!r} is empty"))
            continue
        if task_id in seen:
            if row_id is not None:
                raise ValueError(f"{where}: id {row_id!r} ({SOURCE_KEY}.id_field={source.id_field!r}) is repeated")
            failures.append(StageFailure(task_id, question, "seeds", DUPLICATE_QUESTION, f"{where}: asked before"))
            continue
        seen.add(task_id)
        tasks.append(SeedTask(task_id, question, f"{source.kind}:{where}", reference_answer=answer))
    return tasks, failures
