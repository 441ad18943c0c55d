"""Multi-turn rollouts through tool environments, and snapshot collection for step-level RL.

``run_episodes`` is the one episode loop of the project (collection and evaluation share it): the
policy answers, tool calls run in the sandbox, the unsolved set shrinks, and the episode ends at the
first turn without calls or after ``max_turns``. Conversations are generated together (continuous
batching: a finished episode's slot is refilled at once).

``collect_snapshots`` writes the reference snapshot records (the original sample, then one record
per tool-calling turn with the history so far, the remaining ``unsolved_set`` and ``solve_rate``)
to JSONL, appending each finished episode in one write and then a progress line, so a killed run
resumes with neither duplicates nor losses; Parquet is written from the JSONL at the end.

    python -m ftrl.run stages=[build_envs,collect] +debug=smoke
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftrl.artifacts import PROGRESS_SUFFIX, atomic_write_text
from ftrl.envs.executor import STATE_FIELD
from ftrl.progress import progress as progress_reporter
from ftrl.types import Sample, count_answers

log = logging.getLogger(__name__)

Parser = Callable[[str], dict]


@dataclass
class Episode:
    """One conversation in flight."""

    index: int
    record: Mapping[str, Any]
    sample: Sample
    messages: list[dict]
    unsolved: dict[str, list[str]]
    total: int
    calls: int = 0
    turns: int = 0
    done: bool = False
    # Why the episode ended early: "context" when its prompt filled the engine's context window.
    ended_by: str | None = None
    snapshots: list[dict] = field(default_factory=list)
    responses: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, index: int, record: Mapping[str, Any]) -> Episode:
        sample = Sample.from_record(record)
        unsolved = copy.deepcopy(sample.unsolved_set)
        return cls(index=index, record=record, sample=sample, messages=copy.deepcopy(sample.messages),
                   unsolved=unsolved, total=count_answers(unsolved))

    @property
    def solved(self) -> int:
        return self.total - count_answers(self.unsolved)

    def snapshot_record(self) -> dict[str, Any]:
        """The reference snapshot after a tool-calling turn (fields exactly as data_sample.py)."""
        remaining = count_answers(self.unsolved)
        snapshot = {
            "messages": copy.deepcopy(self.messages),
            "tools": self.record["tools"],
            "codes": self.record["codes"],
            "unsolved_set": json.dumps(self.unsolved, ensure_ascii=False),
            "solve_rate": 1 - remaining / self.total if self.total else 1.0,
            "data_source": self.record["data_source"],
            "split": self.record["split"],
            "answer": self.record["answer"],
        }
        if self.record.get(STATE_FIELD) not in (None, ""):
            # stateful environments (tau-bench): the reward replays this snapshot's history on the initial state
            snapshot[STATE_FIELD] = self.record[STATE_FIELD]
        return snapshot

    def metrics(self) -> dict[str, float]:
        from ftrl.types import EpisodeResult

        return EpisodeResult(self.messages, self.sample.data_source, self.calls, self.solved, self.total,
                             self.turns).metrics()


def _refill(pending: deque, active: list[Episode], batch_size: int, snapshots: bool) -> None:
    """Start pending episodes until ``batch_size`` are in flight (the first snapshot is the record)."""
    while pending and len(active) < batch_size:
        index, record = pending.popleft()
        episode = Episode.start(index, record)
        if snapshots:
            # reference fields only (no gold_calls), like every later snapshot of the episode
            episode.snapshots.append(episode.snapshot_record())
        active.append(episode)


def _policy_turn(engine: Any, active: list[Episode], params: Any, parser: Parser) -> list[Episode]:
    """One generated turn for every active episode; returns those that called tools (others end)."""
    from ftrl.llm.engines.base import ChatRequest

    requests = [ChatRequest(messages=ep.messages, tools=ep.sample.tools) for ep in active]
    generations = engine.generate(requests, params)
    calling: list[Episode] = []
    for episode, outputs in zip(active, generations):
        generation = outputs[0]
        if getattr(generation, "finish_reason", None) == "context":
            # The conversation no longer fits the context window: the episode ends here, no turn added.
            episode.ended_by = "context"
            episode.done = True
            continue
        message = getattr(generation, "message", None) or parser(generation.text)
        episode.responses.append(generation.text)
        episode.messages.append(message)
        episode.turns += 1
        if message.get("tool_calls"):
            calling.append(episode)
        else:
            episode.done = True
    return calling


def _tool_turn(
    calling: list[Episode],
    execute: Callable[[list[tuple[Any, list[dict]]]], list[list[str]]],
    max_turns: int,
    snapshots: bool,
) -> None:
    """Run the calling episodes' tool calls in one batch, append the results, shrink the unsolved sets."""
    from ftrl.envs.executor import TurnContext
    from ftrl.envs.verify import apply_tool_results

    # The turn context lets stateful environments (tau-bench) rebuild their state.
    results = execute([
        (ep.sample.codes, ep.messages[-1]["tool_calls"], TurnContext(ep.record, ep.messages[:-1]))
        for ep in calling
    ])
    for episode, outputs in zip(calling, results):
        tool_calls = episode.messages[-1]["tool_calls"]
        episode.messages.extend(
            {"role": "tool", "content": output, "tool_call_id": call["id"]}
            for call, output in zip(tool_calls, outputs)
        )
        episode.calls += len(tool_calls)
        apply_tool_results(tool_calls, outputs, episode.unsolved)
        if snapshots:
            episode.snapshots.append(episode.snapshot_record())
        if episode.turns >= max_turns:
            episode.done = True


def _retire(active: list[Episode], on_done: Callable[[Episode], None], bar: Any) -> list[Episode]:
    """Hand finished episodes to ``on_done`` (in batch order); the ones still in flight."""
    still_active = []
    for episode in active:
        if episode.done:
            on_done(episode)
            bar.update(1)
        else:
            still_active.append(episode)
    return still_active


def run_episodes(
    engine: Any,
    records: Sequence[tuple[int, Mapping[str, Any]]],
    *,
    params: Any,
    max_turns: int,
    parser: Parser,
    execute: Callable[[list[tuple[Any, list[dict]]]], list[list[str]]],
    on_done: Callable[[Episode], None],
    batch_size: int = 32,
    snapshots: bool = False,
    desc: str = "episodes",
    progress: bool = True,
) -> None:
    """Play every (index, record) to the end and hand each finished Episode to ``on_done``.

    ``execute`` runs a batch of turns' tool calls: ``[(codes, tool_calls), ...] -> [[output, ...], ...]``
    (``Sandbox.map_calls`` bound to a timeout).
    """
    pending = deque(records)
    active: list[Episode] = []
    bar = progress_reporter(total=len(records), desc=desc, unit="ep", disable=not progress)
    while pending or active:
        _refill(pending, active, batch_size, snapshots)
        calling = _policy_turn(engine, active, params, parser)
        if calling:
            _tool_turn(calling, execute, max_turns, snapshots)
        active = _retire(active, on_done, bar)
        bar.set_postfix(active=len(active), pending=len(pending))
    bar.close()


def executor_from_config(cfg: Any) -> Callable[[list[tuple[Any, ...]]], list[list[str]]]:
    """``[(codes, tool_calls[, TurnContext]), ...] -> [[output, ...], ...]`` through the shared sandbox.

    Stateless environments run their calls as they are; stateful ones (a record ``state`` field, e.g.
    tau-bench) replay the episode's earlier calls on a fresh copy of their initial state first.
    """
    from ftrl.envs.executor import executor_from_config as stateful_executor

    return stateful_executor(cfg)


def parser_from_config(cfg: Any) -> Parser:
    """The model family's tool-call parser under the reward's compat mode (one parse everywhere)."""
    from ftrl.llm.parsers import get_parser

    return get_parser(cfg.model.parser, cfg.reward.compat)


# ---------------------------------------------------------------------------- resumable JSONL
def _episode_key(record: Mapping[str, Any]) -> str:
    return hashlib.sha1(Sample.from_record(record).question.encode("utf-8")).hexdigest()[:12]


class EpisodeLog:
    """Append-only JSONL of records grouped by episode, with a progress file that makes it resumable.

    Each finished episode appends its records in one write, then one progress line
    ``{"index", "key", "records"}``. On reopen, the data file is truncated to the records that the
    progress file accounts for, so an episode cut off mid-write is dropped and played again.
    Each write reaches the operating system at once (a killed process loses nothing it appended);
    both files are fsynced at most every ``FSYNC_EVERY_S`` seconds, so a power cut costs at most
    that much replay (one fsync per episode was most of a fast episode's time).
    """

    FSYNC_EVERY_S = 2.0

    def __init__(self, path: Path, key: Callable[[Mapping[str, Any]], str] | None = None) -> None:
        self.path = Path(path)
        self.key = key or _episode_key  # what identifies an episode's input (benchmarks: their sample id)
        self.progress_path = self.path.with_suffix(PROGRESS_SUFFIX)
        self.done: dict[int, dict[str, Any]] = {}
        self._synced_at = time.monotonic()
        self._recover()

    def _recover(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        entries: list[dict[str, Any]] = []
        if self.progress_path.exists():
            for line in self.progress_path.read_text(encoding="utf-8").splitlines():
                try:
                    entries.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a torn last line: everything after it is re-done
        expected = sum(entry["records"] for entry in entries)
        lines: list[str] = []
        if self.path.exists():
            with open(self.path, encoding="utf-8") as handle:
                for line in handle:
                    if len(lines) == expected:
                        break
                    if not line.endswith("\n"):
                        break
                    lines.append(line)
        if len(lines) < expected:
            # Progress claims more than the data file holds: keep only the episodes fully present.
            kept, count = [], 0
            for entry in entries:
                if count + entry["records"] > len(lines):
                    break
                kept.append(entry)
                count += entry["records"]
            entries, lines = kept, lines[:count]
        self._rewrite(lines, entries)
        self.done = {entry["index"]: entry for entry in entries}
        if entries:
            log.info("resume %s: %d episodes already done (%d records)", self.path.name, len(entries), len(lines))

    def _rewrite(self, lines: list[str], entries: list[dict[str, Any]]) -> None:
        for target, content in ((self.path, "".join(lines)),
                                (self.progress_path, "".join(json.dumps(e) + "\n" for e in entries))):
            atomic_write_text(target, content)

    def check_key(self, index: int, record: Mapping[str, Any]) -> bool:
        """True if episode ``index`` is done; raise if the done entry belongs to another question."""
        entry = self.done.get(index)
        if entry is None:
            return False
        if entry["key"] != self.key(record):
            raise RuntimeError(
                f"{self.progress_path}: episode {index} was recorded for a different question; the "
                "environment set changed since this file was written. Remove the round directory to "
                "collect again."
            )
        return True

    def append(self, index: int, record: Mapping[str, Any], rows: Iterable[Mapping[str, Any]]) -> None:
        rows = list(rows)
        payload = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        sync = time.monotonic() - self._synced_at >= self.FSYNC_EVERY_S
        for target, text in ((self.path, payload),
                             (self.progress_path,
                              json.dumps({"index": index, "key": self.key(record), "records": len(rows)}) + "\n")):
            with open(target, "a", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                if sync:
                    os.fsync(handle.fileno())
        if sync:
            self._synced_at = time.monotonic()
        self.done[index] = {"index": index, "records": len(rows)}

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with open(self.path, encoding="utf-8") as handle:
            return [json.loads(line) for line in handle]


def collect_snapshots(
    engine: Any,
    envs: Sequence[Mapping[str, Any]],
    out_path: Path,
    *,
    params: Any,
    max_turns: int,
    parser: Parser,
    execute: Callable[[list[tuple[Any, list[dict]]]], list[list[str]]],
    batch_size: int = 32,
    desc: str = "collect",
) -> dict[str, float]:
    """Roll the policy through ``envs`` and append reference snapshot records to ``out_path``."""
    episode_log = EpisodeLog(out_path)
    todo = [(i, record) for i, record in enumerate(envs) if not episode_log.check_key(i, record)]
    stats = {"episodes": 0.0, "snapshots": 0.0, "turns": 0.0, "calls": 0.0, "solve_rate": 0.0,
             "context_limited": 0.0}

    def on_done(episode: Episode) -> None:
        episode_log.append(episode.index, episode.record, episode.snapshots)
        stats["episodes"] += 1
        stats["snapshots"] += len(episode.snapshots)
        stats["turns"] += episode.turns
        stats["calls"] += episode.calls
        stats["solve_rate"] += episode.solved / episode.total if episode.total else 0.0
        stats["context_limited"] += episode.ended_by == "context"

    run_episodes(engine, todo, params=params, max_turns=max_turns, parser=parser, execute=execute,
                 on_done=on_done, batch_size=batch_size, snapshots=True, desc=desc)
    episodes = max(stats["episodes"], 1.0)
    return {
        "episodes_run": int(stats["episodes"]),
        "episodes_resumed": len(envs) - len(todo),
        "snapshots_written": int(stats["snapshots"]),
        "mean_turns": stats["turns"] / episodes,
        "mean_calls": stats["calls"] / episodes,
        "mean_solve_rate": stats["solve_rate"] / episodes,
        "episodes_context_limited": int(stats["context_limited"]),
    }
