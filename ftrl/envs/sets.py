"""Versioned environment sets: content-hashed directories of reference records you can list, inspect and mix.

A set lives in ``<envs.sets_dir>/<name>-<hash>/`` (default ``outputs/env_sets``), where ``hash`` is
:func:`ftrl.envs.io.env_set_hash` of its records, so a changed set is a new version beside the old::

    train.jsonl, test.jsonl   reference records (docs/reference.md §2) plus gold_calls on every record
                              when the builder knows them (procedural, llm, taubench sets)
    manifest.json             name, hash, format, created, source, counts and statistics per split and
                              scenario, plus what the producer adds (the LLM builder: model, endpoint,
                              prompt hashes, knobs, token/cost accounting)
    report.json               the build report, when a builder wrote one (per stage: in, out, why)

A set is named by its directory path, by ``name-hash`` (a hash prefix is enough), or by ``name``
alone (the newest version). Runs use sets with ``envs=set envs.mix={<set>: <weight>, ...}``: the
train splits are mixed (weight 1.0 takes a set's train split once, 0.5 a seeded half, 2.0 twice)
and the test splits are concatenated.

    python -m ftrl.envs.sets list
    python -m ftrl.envs.sets show weather --split train --index 0
    python -m ftrl.envs.sets import procedural-400 --train envs/train.jsonl --test envs/test.jsonl
    python -m ftrl.envs.sets mix mixed llm=1.0 procedural-400=0.5
    python -m ftrl.envs.sets export procedural-400 --out /tmp/ref --format reference   # [--type parquet]

Gold trajectories are build-side knowledge: stored sets keep them (the warm start and ``show`` use
them); ``export --format reference`` writes exactly the reference fields, never ``gold_calls``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import re
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftrl.artifacts import atomic_dir, write_json
from ftrl.envs.io import env_set_hash, read_records, write_jsonl
from ftrl.errors import did_you_mean
from ftrl.types import SPLITS, Sample, as_json_obj, count_answers, make_tool_call

log = logging.getLogger(__name__)

FORMAT = "ftrl-reference/1"
MANIFEST = "manifest.json"
REPORT = "report.json"
DEFAULT_SETS_DIR = "outputs/env_sets"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


class EnvRecords(dict):
    """``{"train": [...], "test": [...]}`` as environment sources return it, plus where it came from.

    A plain dict to every consumer; ``manifest`` (and ``path`` for a stored set) let the run's
    ``envs/manifest.json`` name the set and its build.
    """

    manifest: dict[str, Any]
    path: Path | None

    def __init__(
        self,
        records: Mapping[str, list[dict[str, Any]]],
        manifest: Mapping[str, Any] | None = None,
        path: Path | None = None,
    ) -> None:
        super().__init__(records)
        self.manifest = dict(manifest or {})
        self.path = path


@dataclass
class EnvSet:
    path: Path
    manifest: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.manifest.get("name", self.path.name))

    @property
    def hash(self) -> str:
        return str(self.manifest.get("hash", ""))

    @property
    def ref(self) -> str:
        return self.path.name

    def records(self, split: str) -> list[dict[str, Any]]:
        path = self.path / f"{split}.jsonl"
        return read_records(path) if path.exists() else []

    def all_records(self) -> dict[str, list[dict[str, Any]]]:
        return {split: self.records(split) for split in SPLITS}

    def report(self) -> dict[str, Any] | None:
        path = self.path / REPORT
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


# ----------------------------------------------------------------------------------- writing
def statistics(records: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, dict[str, dict[str, float]]]:
    """Per split and scenario: count, and means of sub-answers, tools, distractors, gold turns and calls."""
    stats: dict[str, dict[str, dict[str, float]]] = {}
    for split, rows in records.items():
        sums: dict[str, Counter] = defaultdict(Counter)
        for record in rows:
            tools = as_json_obj(record["tools"])
            unsolved = as_json_obj(record["unsolved_set"])
            entry = sums[str(record["data_source"])]
            entry["count"] += 1
            entry["sub_answers"] += count_answers(unsolved)
            entry["tools"] += len(tools)
            entry["distractors"] += sum(1 for t in tools if t["function"]["name"] not in unsolved)
            if "gold_calls" in record:
                turns = as_json_obj(record["gold_calls"])
                entry["gold_turns"] += len(turns)
                entry["gold_calls"] += sum(len(turn) for turn in turns)
        stats[split] = {
            scenario: {
                "count": float(c["count"]),
                **{
                    f"mean_{k}": round(c[k] / c["count"], 4)
                    for k in ("sub_answers", "tools", "distractors", "gold_turns", "gold_calls")
                },
            }
            for scenario, c in sorted(sums.items())
        }
    return stats


def write_set(
    records: Mapping[str, Sequence[Mapping[str, Any]]],
    *,
    name: str,
    sets_dir: str | os.PathLike,
    manifest: Mapping[str, Any] | None = None,
    report: Mapping[str, Any] | None = None,
) -> EnvSet:
    """Store a set as ``<sets_dir>/<name>-<hash>/`` (atomically); the same content keeps its directory."""
    if not _NAME.match(name):
        raise ValueError(f"env set name {name!r}: use letters, digits and . _ + - (no slashes or spaces)")
    splits = {split: list(records.get(split, [])) for split in SPLITS}
    digest = env_set_hash(splits)
    root = Path(sets_dir)
    target = root / f"{name}-{digest}"
    created = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if (target / MANIFEST).exists():
        created = json.loads((target / MANIFEST).read_text(encoding="utf-8")).get("created", created)
    full = {
        "name": name,
        "hash": digest,
        "format": FORMAT,
        "created": created,
        "counts": {
            split: dict(sorted(Counter(str(r["data_source"]) for r in rows).items()))
            for split, rows in splits.items()
        },
        "statistics": statistics(splits),
        **dict(manifest or {}),
    }
    if not target.exists():
        # if_exists="keep": another process may store the same content meanwhile.
        with atomic_dir(target, if_exists="keep") as tmp:
            for split, rows in splits.items():
                write_jsonl(tmp / f"{split}.jsonl", rows)
    write_json(target / MANIFEST, full)
    if report is not None:
        write_json(target / REPORT, report)
    return EnvSet(target, full)


# ----------------------------------------------------------------------------------- finding
def list_sets(sets_dir: str | os.PathLike = DEFAULT_SETS_DIR) -> list[EnvSet]:
    """Every stored set, by name then creation time."""
    root = Path(sets_dir)
    if not root.is_dir():
        return []
    found = []
    for path in sorted(root.iterdir()):
        if path.is_dir() and not path.name.startswith(".") and (path / MANIFEST).is_file():
            try:
                found.append(EnvSet(path, json.loads((path / MANIFEST).read_text(encoding="utf-8"))))
            except ValueError:
                log.warning("env sets: skipping %s (unreadable manifest)", path)
    return sorted(found, key=lambda s: (s.name, str(s.manifest.get("created", ""))))


def resolve_set(ref: str, sets_dir: str | os.PathLike = DEFAULT_SETS_DIR) -> EnvSet:
    """A set by directory path, ``name-hash`` (or a unique prefix of it), or ``name`` (newest version)."""
    path = Path(ref).expanduser()
    if (path / MANIFEST).is_file():
        return EnvSet(path, json.loads((path / MANIFEST).read_text(encoding="utf-8")))
    available = list_sets(sets_dir)
    exact = [s for s in available if s.ref == ref]
    if exact:
        return exact[0]
    by_name = [s for s in available if s.name == ref]
    if by_name:
        if len(by_name) > 1:
            log.info("env set '%s': %d versions, using the newest %s", ref, len(by_name), by_name[-1].ref)
        return by_name[-1]
    prefixed = [
        s for s in available if s.ref.startswith(ref) and len(ref) > len(s.name) + 1
    ]  # name-<hash prefix>
    if len(prefixed) == 1:
        return prefixed[0]
    refs = [s.ref for s in available]
    if len(prefixed) > 1:
        raise LookupError(f"env set '{ref}' is ambiguous: {[s.ref for s in prefixed]}")
    raise LookupError(
        f"no env set '{ref}' in {Path(sets_dir).resolve()} (a path, name or name-hash); "
        f"available: {refs or 'none'}{did_you_mean(ref, refs + [s.name for s in available])}"
    )


# ----------------------------------------------------------------------------------- mixing
def mix_sets(
    weights: Mapping[str, float], sets_dir: str | os.PathLike = DEFAULT_SETS_DIR, seed: int = 0
) -> EnvRecords:
    """Train splits mixed by weight (whole copies + a seeded sample), test splits concatenated."""
    if not weights:
        raise ValueError(
            "envs.mix is empty: name at least one env set, e.g. envs.mix='{my_set: 1.0}' "
            f"(sets in {sets_dir}: {[s.ref for s in list_sets(sets_dir)] or 'none'})"
        )
    rng = random.Random(seed)
    train: list[dict[str, Any]] = []
    test: list[dict[str, Any]] = []
    composition = []
    for ref, weight in weights.items():
        if weight is None or not weight > 0:
            raise ValueError(f"envs.mix.{ref}: weight must be > 0, got {weight!r}")
        env_set = resolve_set(ref, sets_dir)
        rows = env_set.records("train")
        copies = math.floor(weight)
        sample = round((weight - copies) * len(rows))
        taken = rows * copies + [rows[i] for i in sorted(rng.sample(range(len(rows)), sample))]
        test_rows = env_set.records("test")
        train.extend(taken)
        test.extend(test_rows)
        composition.append(
            {
                "ref": ref,
                "set": env_set.ref,
                "hash": env_set.hash,
                "weight": weight,
                "train": len(taken),
                "test": len(test_rows),
            }
        )
        log.info(
            "envs.mix: %s (%s) weight %g -> %d of %d train, %d test",
            ref,
            env_set.ref,
            weight,
            len(taken),
            len(rows),
            len(test_rows),
        )
    rng.shuffle(train)
    return EnvRecords({"train": train, "test": test}, {"source": "set", "mix": composition, "mix_seed": seed})


# ----------------------------------------------------------------------------------- export
EXPORT_FORMATS: tuple[str, ...] = ("reference", "internal")
EXPORT_FILE_TYPES: tuple[str, ...] = ("jsonl", "parquet")


def export_records(records: Sequence[Mapping[str, Any]], where: str, fmt: str = "reference") -> list[dict[str, Any]]:
    """A split's records as ``fmt`` writes them; refuses (naming ``where``, the record and the tool) what it cannot.

    ``reference``: exactly the reference fields of docs/reference.md §2, in order (no ``gold_calls``),
    every tool schema valid for OpenAI-style tool calling (:func:`ftrl.envs.io.tool_schema_problems`);
    a stateful record (field ``state``) is refused, as the reference format cannot run it.
    ``internal``: the records as stored, extra fields included.
    """
    from ftrl.envs.executor import STATE_FIELD
    from ftrl.envs.io import RecordError, reference_record, tool_schema_problems, validate_record

    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"export format '{fmt}': valid {list(EXPORT_FORMATS)}")
    exported = []
    for index, record in enumerate(records):
        place = f"{where} record {index + 1}"
        validate_record(record, place)
        if fmt == "internal":
            exported.append(dict(record))
            continue
        if record.get(STATE_FIELD) not in (None, ""):
            raise RecordError(f"{place}: a stateful environment (field '{STATE_FIELD}') cannot be written in the "
                              "reference format; use --format internal")
        for tool in as_json_obj(record["tools"]):
            problems = tool_schema_problems(tool)
            if problems:
                raise RecordError(f"{place}: tool schema is not valid for OpenAI-style tool calling: {problems[0]}")
        exported.append(reference_record(record))
    return exported


def export_set(env_set: EnvSet, out: str | os.PathLike, *, fmt: str = "reference",
               file_type: str = "jsonl") -> dict[str, Path]:
    """Write every split of ``env_set`` to ``<out>/<split>.<file_type>`` (:func:`export_records`); the paths."""
    from ftrl.envs.io import write_parquet

    if file_type not in EXPORT_FILE_TYPES:
        raise ValueError(f"export file type '{file_type}': valid {list(EXPORT_FILE_TYPES)}")
    written = {}
    for split in SPLITS:
        rows = export_records(env_set.records(split), f"{env_set.ref} {split}", fmt)
        path = Path(out) / f"{split}.{file_type}"
        written[split] = write_jsonl(path, rows) if file_type == "jsonl" else write_parquet(path, rows)
    return written


# ----------------------------------------------------------------------------------- inspection
def _signature(tool: Mapping[str, Any]) -> str:
    function = tool["function"]
    parameters = function.get("parameters", {})
    required = set(parameters.get("required", []))
    params = []
    for name, spec in parameters.get("properties", {}).items():
        declared = spec.get("type", "any") if isinstance(spec, dict) else "any"
        declared = "|".join(declared) if isinstance(declared, list) else declared
        params.append(f"{name}: {declared}" + ("" if name in required else " = ..."))
    return f"{function['name']}({', '.join(params)})"


def _summary_lines(sample: Sample) -> list[str]:
    """Scenario, conversation, answer, tools (distractors marked) and the expected sub-answers."""
    lines = [f"scenario: {sample.data_source}   split: {sample.split}"]
    for message in sample.messages:
        content = str(message.get("content") or "")
        lines.append(f"{message['role']}: {content if len(content) < 400 else content[:400] + ' ...'}")
    lines.append(f"answer: {sample.answer}")
    distractors = [t for t in sample.tools if t["function"]["name"] not in sample.unsolved_set]
    lines.append(f"tools ({len(sample.tools) - len(distractors)} answering, {len(distractors)} distractor):")
    for tool in sample.tools:
        mark = "  [distractor]" if tool in distractors else ""
        description = str(tool["function"].get("description", "")).split("\n")[0][:100]
        lines.append(f"  {_signature(tool)}  - {description}{mark}")
    lines.append(f"unsolved_set: {json.dumps(sample.unsolved_set, ensure_ascii=False)[:600]}")
    return lines


def _gold_turn_calls(number: int, turn: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [make_tool_call(c["name"], c["arguments"], f"gold_{number}_{i}") for i, c in enumerate(turn)]


def _gold_call_lines(
    number: int, calls: list[dict[str, Any]], outputs: list[str | None], unsolved: dict[str, list]
) -> list[str]:
    """One line per call of a gold turn; executed calls show their output and update ``unsolved``."""
    from ftrl.envs.verify import apply_tool_results

    lines = []
    for call, output in zip(calls, outputs):
        text = f"  turn {number}: {call['function']['name']}({call['function']['arguments']})"
        if output is not None:
            before = count_answers(unsolved)
            apply_tool_results([call], [output], unsolved)
            solved = "  [solves a sub-answer]" if count_answers(unsolved) < before else ""
            text += f"\n      -> {output[:300]}{solved}"
        lines.append(text)
    return lines


def _gold_chain_lines(
    record: Mapping[str, Any],
    sample: Sample,
    gold: Any,
    execute: Callable[[list[tuple[Any, ...]]], list[list[str]]] | None,
) -> list[str]:
    """The gold chain turn by turn; with ``execute``, run against the tools with a growing history."""
    from ftrl.envs.executor import TurnContext

    turns = as_json_obj(gold)
    lines = [f"gold chain ({len(turns)} turn(s)):"]
    unsolved = {k: list(v) for k, v in sample.unsolved_set.items()}
    history = list(sample.messages)
    for number, turn in enumerate(turns, start=1):
        calls = _gold_turn_calls(number, turn)
        outputs: list[str | None] = [None] * len(calls)
        if execute is not None:
            outputs = list(execute([(sample.codes, calls, TurnContext(record, history))])[0])
            history = (
                history
                + [{"role": "assistant", "content": "", "tool_calls": calls}]
                + [
                    {"role": "tool", "content": o, "tool_call_id": c["id"]}
                    for c, o in zip(calls, outputs)
                ]
            )
        lines.extend(_gold_call_lines(number, calls, outputs, unsolved))
    if execute is not None:
        lines.append(f"  unsolved after the gold chain: {count_answers(unsolved)}")
    return lines


def format_env(
    record: Mapping[str, Any],
    *,
    execute: Callable[[list[tuple[Any, ...]]], list[list[str]]] | None = None,
    show_codes: bool = True,
) -> str:
    """One environment pretty-printed: question, answer, tools, expected sub-answers, gold chain, code.

    With ``execute`` (``[(codes, calls[, context])] -> outputs``), the gold chain is run and each
    call's output is shown with the sub-answer it solves.
    """
    sample = Sample.from_record(record)
    lines = _summary_lines(sample)
    gold = sample.extra.get("gold_calls")
    if gold is not None:
        lines.extend(_gold_chain_lines(record, sample, gold, execute))
    if show_codes:
        lines.append("codes:")
        for name, source in sample.codes.items():
            lines.append(f"  --- {name} ---")
            lines.extend("  " + line for line in source.rstrip().splitlines())
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- CLI
def _print_list(sets_dir: str) -> None:
    found = list_sets(sets_dir)
    if not found:
        print(f"no env sets in {Path(sets_dir).resolve()}")
        return
    print(f"{'set':40s} {'source':10s} {'train':>6s} {'test':>6s}  created")
    for env_set in found:
        counts = env_set.manifest.get("counts", {})
        sizes = [sum(counts.get(split, {}).values()) for split in SPLITS]
        print(
            f"{env_set.ref:40s} {env_set.manifest.get('source', '?')!s:10s} {sizes[0]:6d} {sizes[1]:6d}  "
            f"{env_set.manifest.get('created', '?')}"
        )


def _print_show(args: argparse.Namespace) -> None:
    env_set = resolve_set(args.set, args.sets_dir)
    manifest = env_set.manifest
    print(f"env set {env_set.ref} at {env_set.path}")
    for key in ("source", "counts", "builder", "knobs", "usage"):
        if key in manifest:
            print(f"  {key}: {json.dumps(manifest[key], ensure_ascii=False)}")
    report = env_set.report()
    if report and "stages" in report:
        print(
            "  build: " + "; ".join(f"{s['stage']} {s['entered']}->{s['passed']}" for s in report["stages"])
        )
    rows = env_set.records(args.split)
    if not rows:
        print(f"(no {args.split} environments)")
        return
    if not 0 <= args.index < len(rows):
        raise SystemExit(f"--index {args.index}: the {args.split} split has {len(rows)} environments")
    print(f"\n[{args.split} #{args.index} of {len(rows)}]")
    execute = None
    if not args.no_run:
        from ftrl.envs.executor import StatefulExecutor

        execute = StatefulExecutor(data_dir=args.data_dir)
    print(format_env(rows[args.index], execute=execute, show_codes=not args.no_codes))


def _import_files(args: argparse.Namespace) -> None:
    from ftrl.envs.io import validate_record

    records = {}
    for split in SPLITS:
        path = getattr(args, split)
        records[split] = read_records(path) if path else []
        for index, record in enumerate(records[split]):
            validate_record(record, f"{path}:{index + 1}")
    stored = write_set(
        records,
        name=args.name,
        sets_dir=args.sets_dir,
        manifest={"source": args.source, "imported_from": {"train": args.train, "test": args.test}},
    )
    print(f"stored {stored.path}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ftrl.envs.sets", description=__doc__.split("\n")[0])
    parser.add_argument("--sets-dir", default=os.environ.get("FTRL_SETS_DIR", DEFAULT_SETS_DIR))
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="list stored sets")
    show = commands.add_parser("show", help="pretty-print one environment of a set (its gold chain is run)")
    show.add_argument("set", help="path, name-hash (or prefix) or name")
    show.add_argument("--split", default="train", choices=list(SPLITS))
    show.add_argument("--index", type=int, default=0)
    show.add_argument("--no-run", action="store_true", help="do not run the gold chain in the sandbox")
    show.add_argument("--no-codes", action="store_true", help="do not print the tool sources")
    show.add_argument("--data-dir", default=None, help="data directory for stateful (tau-bench) sets")
    imp = commands.add_parser("import", help="store reference train/test files as a set")
    imp.add_argument("name")
    imp.add_argument("--train")
    imp.add_argument("--test")
    imp.add_argument("--source", default="files")
    export = commands.add_parser("export", help="write a set's splits as reference files (or as stored)")
    export.add_argument("set", help="path, name-hash (or prefix) or name")
    export.add_argument("--out", required=True, help="directory for <split>.jsonl (or .parquet)")
    export.add_argument("--format", default="reference", choices=list(EXPORT_FORMATS),
                        help="reference: exactly the reference fields (no gold_calls); internal: as stored")
    export.add_argument("--type", default="jsonl", choices=list(EXPORT_FILE_TYPES), dest="file_type")
    mix = commands.add_parser("mix", help="store a weighted mix of sets as a new set")
    mix.add_argument("name")
    mix.add_argument("weights", nargs="+", help="SET=WEIGHT ...")
    mix.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            _print_list(args.sets_dir)
        elif args.command == "show":
            _print_show(args)
        elif args.command == "export":
            env_set = resolve_set(args.set, args.sets_dir)
            for split, path in export_set(env_set, args.out, fmt=args.format, file_type=args.file_type).items():
                print(f"wrote {len(env_set.records(split))} {split} records ({args.format}) to {path}")
        elif args.command == "import":
            _import_files(args)
        else:
            weights = {}
            for item in args.weights:
                ref, _, weight = item.rpartition("=")
                if not ref:
                    raise SystemExit(f"'{item}': expected SET=WEIGHT")
                weights[ref] = float(weight)
            mixed = mix_sets(weights, args.sets_dir, args.seed)
            stored = write_set(mixed, name=args.name, sets_dir=args.sets_dir, manifest=mixed.manifest)
            print(f"stored {stored.path} ({len(mixed['train'])} train, {len(mixed['test'])} test)")
    except (LookupError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
