"""tau-bench's tools, codes and databases as a stateful environment family (``envs=taubench``).

Layout read (``<data_dir>/tau-bench/``, ``data_dir`` = ``envs.taubench.data_dir`` or the
``FTRL_DATA_DIR`` environment variable; nothing is read from a fixed location)::

    tasks.jsonl            {"instruction", "actions": [OpenAI tool calls], "outputs": [str], "data_source"}
    <domain>/tools.json    OpenAI function schemas (the model sees these; no ``data`` parameter)
    <domain>/codes.json    {tool: python source of ``def tool(data, ...)``}
    <domain>/*.json        the domain database, one table per file (users.json -> data["users"])
    <domain>/wiki.md       the agent policy (the system message when envs.taubench.include_policy)

Each task becomes a reference record: messages = [policy, instruction]; tools/codes of its domain;
``gold_calls`` = the task's actions, one per turn; ``unsolved_set`` = each action's output when the
actions are replayed in order on a fresh database (so a model solves a sub-answer by making the same
consequential call in the same state); ``answer`` = the task's expected outputs joined by ", ";
``data_source`` = ``tau-bench/<domain>``; and one extra field, ``state`` (a JSON string):
``{"family": "taubench", "domain", "db_sha256"[, "db"]}``.

State across turns: tool functions receive the database as ``data`` and mutate it; the state is
rebuilt for every turn by replaying the episode's earlier calls on a fresh copy of the database
(:class:`ftrl.envs.executor.StatefulExecutor`, which reads ``state`` and finds the database by
``db_sha256`` in the data directory, or inside the record with ``envs.taubench.embed_db=true``).
This module only imports: it loads domains and turns tasks into records.

    FTRL_DATA_DIR=/path/to/data python -m ftrl.run stages=[build_envs] envs=taubench
    FTRL_DATA_DIR=/path/to/data python -m ftrl.envs.taubench --domain retail --max-tasks 3
    python -m pytest tests/test_taubench_import.py -q
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import os
import random
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftrl.config import TauBenchConfig
from ftrl.envs import sandbox as sandbox_module
from ftrl.envs.executor import FAMILY, STATE_FIELD
from ftrl.types import is_tool_error, make_tool_call

log = logging.getLogger(__name__)

TAU_SUBDIR = "tau-bench"
DOMAINS: tuple[str, ...] = ("airline", "retail")
_NOT_TABLES = {"tools.json", "codes.json"}


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """The directory holding ``tau-bench/``: the configured one, else ``$FTRL_DATA_DIR``."""
    chosen = data_dir or os.environ.get("FTRL_DATA_DIR")
    if not chosen:
        raise FileNotFoundError(
            "tau-bench data: set envs.taubench.data_dir (or the FTRL_DATA_DIR environment "
            f"variable) to the directory that holds {TAU_SUBDIR}/"
        )
    root = Path(chosen).expanduser()
    if not (root / TAU_SUBDIR).is_dir():
        raise FileNotFoundError(
            f"tau-bench data: '{root}' has no {TAU_SUBDIR}/ directory (from "
            f"{'envs.taubench.data_dir' if data_dir else 'FTRL_DATA_DIR'})"
        )
    return root


def db_digest(db: Mapping[str, Any]) -> str:
    text = json.dumps(db, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class Domain:
    name: str
    tools: list[dict[str, Any]]
    codes: dict[str, str]
    db: dict[str, Any]
    wiki: str
    db_sha256: str


@functools.lru_cache(maxsize=4)
def load_domain(root: Path, name: str) -> Domain:
    """One domain's tools, codes, database tables and policy (cached: the databases are MBs)."""
    if name not in DOMAINS:
        raise ValueError(f"tau-bench domain '{name}': valid domains are {list(DOMAINS)}")
    directory = Path(root) / TAU_SUBDIR / name
    for required in ("tools.json", "codes.json"):
        if not (directory / required).is_file():
            raise FileNotFoundError(f"tau-bench domain '{name}': missing {directory / required}")
    tools = json.loads((directory / "tools.json").read_text(encoding="utf-8"))
    codes = json.loads((directory / "codes.json").read_text(encoding="utf-8"))
    missing = sorted({t["function"]["name"] for t in tools} - set(codes))
    if missing:
        raise ValueError(f"{directory}: tools.json names tools without code in codes.json: {missing}")
    db = {
        path.stem: json.loads(path.read_text(encoding="utf-8"))
        for path in sorted(directory.glob("*.json"))
        if path.name not in _NOT_TABLES
    }
    if not db:
        raise FileNotFoundError(f"{directory}: no database tables (*.json besides tools.json and codes.json)")
    wiki = (directory / "wiki.md").read_text(encoding="utf-8") if (directory / "wiki.md").is_file() else ""
    return Domain(name, tools, codes, db, wiki, db_digest(db))


# ------------------------------------------------------------------------------------ import
@dataclass
class ImportReport:
    tasks: int = 0
    kept: int = 0
    no_actions: int = 0
    unknown_tool: int = 0
    gold_error: int = 0

    def summary(self) -> str:
        return (
            f"tau-bench: {self.tasks} tasks -> {self.kept} environments (skipped: {self.no_actions} without "
            f"actions, {self.unknown_tool} calling unknown tools, {self.gold_error} whose gold calls fail)"
        )


def _split_of(instruction: str, test_fraction: float, seed: int) -> str:
    digest = hashlib.sha256(f"{seed}:{instruction}".encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2**64 < test_fraction else "train"


def _gold_calls(
    tasks_path: Path, domains: Mapping[str, Domain], max_tasks: int | None, report: ImportReport
) -> list[tuple[dict[str, Any], Domain, list[dict[str, Any]]]]:
    """``(task, domain, gold calls)`` of each usable task of ``domains`` (up to ``max_tasks``), counted."""
    pending = []
    for line_number, line in enumerate(tasks_path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        task = json.loads(line)
        domain_name = str(task.get("data_source", "")).rpartition("/")[2]
        if domain_name not in domains:
            continue
        if max_tasks is not None and report.tasks >= max_tasks:
            break
        report.tasks += 1
        domain = domains[domain_name]
        actions = task.get("actions") or []
        if not actions:
            report.no_actions += 1
            continue
        if any(action["function"]["name"] not in domain.codes for action in actions):
            report.unknown_tool += 1
            log.warning(
                "%s:%d: an action calls a tool that %s does not have; skipped",
                tasks_path,
                line_number,
                domain_name,
            )
            continue
        calls = [
            make_tool_call(a["function"]["name"], a["function"]["arguments"], f"gold_{i}")
            for i, a in enumerate(actions)
        ]
        pending.append((task, domain, calls))
    return pending


def _task_record(
    cfg: TauBenchConfig, task: Mapping[str, Any], domain: Domain, calls: list[dict[str, Any]], outputs: list[str]
) -> dict[str, Any]:
    """The reference record of one task whose gold calls returned ``outputs`` (replayed in order)."""
    unsolved: dict[str, list[str]] = {}
    for call, output in zip(calls, outputs):
        unsolved.setdefault(call["function"]["name"], []).append(output)
    state: dict[str, Any] = {"family": FAMILY, "domain": domain.name, "db_sha256": domain.db_sha256}
    if cfg.embed_db:
        state["db"] = domain.db
    messages = [{"role": "system", "content": domain.wiki}] if cfg.include_policy and domain.wiki else []
    messages.append({"role": "user", "content": task["instruction"]})
    split = _split_of(task["instruction"], cfg.test_fraction, cfg.seed)
    return {
        "messages": messages,
        "tools": json.dumps(domain.tools, ensure_ascii=False),
        "codes": json.dumps(domain.codes, ensure_ascii=False),
        "unsolved_set": json.dumps(unsolved, ensure_ascii=False),
        "solve_rate": 0.0,
        "answer": ", ".join(str(o) for o in task.get("outputs") or []),
        "data_source": f"tau-bench/{domain.name}",
        "split": split,
        "gold_calls": json.dumps(
            [
                [{"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}]
                for c in calls
            ],
            ensure_ascii=False,
        ),
        STATE_FIELD: json.dumps(state, ensure_ascii=False),
    }


def build_taubench_envs(
    cfg: TauBenchConfig,
    *,
    timeout: float = 10.0,
) -> tuple[dict[str, list[dict[str, Any]]], ImportReport]:
    """Reference records of the tasks of ``cfg.domains`` (``{"train": [...], "test": [...]}``), a report."""
    root = resolve_data_dir(cfg.data_dir)
    tasks_path = root / TAU_SUBDIR / "tasks.jsonl"
    if not tasks_path.is_file():
        raise FileNotFoundError(f"tau-bench data: missing {tasks_path}")
    domains = {name: load_domain(root, name) for name in cfg.domains}
    report = ImportReport()
    pending = _gold_calls(tasks_path, domains, cfg.max_tasks, report)
    box = sandbox_module.get_sandbox()
    results = box.map_calls(
        [(domain.codes, calls, {"data": domain.db}) for _, domain, calls in pending], timeout
    )
    records: dict[str, list[dict[str, Any]]] = {"train": [], "test": []}
    for (task, domain, calls), outputs in zip(pending, results):
        if any(is_tool_error(output) for output in outputs):
            report.gold_error += 1
            continue
        record = _task_record(cfg, task, domain, calls, outputs)
        records[record["split"]].append(record)
        report.kept += 1
    random.Random(cfg.seed).shuffle(records["train"])
    return records, report


def main(argv: Sequence[str] | None = None) -> int:
    from ftrl.envs.io import write_jsonl

    parser = argparse.ArgumentParser(prog="python -m ftrl.envs.taubench", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data-dir", default=None, help="directory holding tau-bench/ (default: $FTRL_DATA_DIR)"
    )
    parser.add_argument("--domain", action="append", choices=list(DOMAINS), help="repeatable; default: all")
    parser.add_argument("--max-tasks", type=int, default=None)
    parser.add_argument("--out", default=None, help="write train.jsonl/test.jsonl here")
    args = parser.parse_args(argv)
    cfg = TauBenchConfig(
        data_dir=args.data_dir, domains=args.domain or list(DOMAINS), max_tasks=args.max_tasks
    )
    try:
        records, report = build_taubench_envs(cfg)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(report.summary())
    if args.out:
        for split, rows in records.items():
            write_jsonl(Path(args.out) / f"{split}.jsonl", rows)
            print(f"wrote {len(rows)} {split} environments to {Path(args.out) / f'{split}.jsonl'}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
