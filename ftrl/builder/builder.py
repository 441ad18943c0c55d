"""Build an environment set with an LLM: seeds -> five stages -> gates -> a versioned set and its report.

:func:`build_env_set` runs, for every seed task, scenario decomposition, document generation,
function integration, complexity scaling and localized deployment (``ftrl.builder.stages``),
then the quality gates (``ftrl.builder.gate``), and stores the surviving environments as a set
(``ftrl.envs.sets``): reference records with ``gold_calls``, a manifest (builder model and endpoint,
prompt hashes, knobs, statistics per scenario, token and cost accounting) and ``report.json``, which
says for each stage how many items entered and left it and, for each seed task that did not become
an environment, the stage, the reason and the evidence; per scaling strategy how often it was drawn,
applied (stage 4 checked it), rejected (stage 4 or the gate's probes blamed it) and kept; and per
kept environment where it came from (seed origin, gold answer, ``merged_from``, strategies).

Seeds: ``envs.llm.seed_file`` (JSONL questions), ``envs.llm.seed_source`` (a QA dataset with gold
answers, ``ftrl.builder.seeds``) and ``envs.llm.topics`` (questions the LLM writes) add up.

Every LLM request goes through the request-keyed cache (``<envs.sets_dir>/.cache/llm`` unless
``envs.llm.cache_dir`` says otherwise): re-running with the same inputs sends no request and gives
the same set; a killed or partly failed build resumes per task and per stage.

    python -m ftrl.builder seed_file=questions.jsonl model=gpt-4o-mini set_name=mine
    python -m ftrl.builder seed_source.kind=jsonl seed_source.path=qa.jsonl seed_source.question_field=query
    python -m ftrl.builder topics='[weather,movies]' model=Qwen/Qwen3-8B \\
        api.base_url=http://localhost:8000/v1 api.api_key_env='' --sets-dir outputs/env_sets
    python -m ftrl.run stages=[build_envs] envs=llm envs.llm.seed_file=questions.jsonl
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ftrl.builder.gate import gate_envs, reference_check
from ftrl.builder.llm import CachingChatEngine, LazyEngine, Ledger, LLMCache, StructuredLLM
from ftrl.builder.prompts import PromptSet, load_prompts
from ftrl.builder.records import SeedTask, StageFailure, tool_name
from ftrl.builder.scaling import STRATEGIES
from ftrl.builder.seeds import assign_split, read_seed_file, read_seed_source, remove_near_duplicates
from ftrl.builder.stages import (
    Knobs,
    StageContext,
    decompose,
    deploy,
    document,
    generate_seeds,
    integrate,
    scale,
)
from ftrl.config import LLMBuildConfig
from ftrl.envs.sets import DEFAULT_SETS_DIR, EnvRecords, EnvSet, write_set
from ftrl.types import SPLITS

log = logging.getLogger(__name__)

STAGE_ORDER: tuple[str, ...] = (
    "seeds",
    "topics",
    "dedup",
    "decompose",
    "document",
    "integrate",
    "scale",
    "deploy",
    "gate",
    "reference",
)


@dataclass
class StageCount:
    stage: str
    entered: int
    passed: int
    failed: dict[str, int] = field(default_factory=dict)


@dataclass
class BuildReport:
    """What the build did: per stage in/out and reasons, every failure, what was kept, what it cost."""

    stages: list[StageCount] = field(default_factory=list)
    failures: list[StageFailure] = field(default_factory=list)
    kept: dict[str, dict[str, int]] = field(default_factory=dict)
    usage: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    # strategy -> {"drawn", "applied", "rejected", "kept"} (drawn - rejected - kept: lost to other reasons)
    scaling: dict[str, dict[str, int]] = field(default_factory=dict)
    envs: list[dict[str, Any]] = field(default_factory=list)  # per kept environment: where it came from

    def record(self, stage: str, entered: int, passed: int, failures: Sequence[StageFailure]) -> None:
        self.stages.append(
            StageCount(stage, entered, passed, dict(sorted(Counter(f.reason for f in failures).items())))
        )
        self.failures.extend(failures)

    def as_dict(self) -> dict[str, Any]:
        return {
            "stages": [asdict(s) for s in self.stages],
            "kept": self.kept,
            "scaling": self.scaling,
            "failures": [f.to_dict() for f in self.failures],
            "envs": self.envs,
            "usage": self.usage,
            "seconds": round(self.seconds, 3),
        }

    def summary(self) -> str:
        flow = "; ".join(
            f"{s.stage} {s.entered}->{s.passed}"
            + (f" ({', '.join(f'{k}={v}' for k, v in s.failed.items())})" if s.failed else "")
            for s in self.stages
        )
        kept = ", ".join(f"{split}={sum(c.values())}" for split, c in self.kept.items())
        run = self.usage.get("this_run", {})
        scaling = "; ".join(
            f"{name} drawn {c['drawn']}, applied {c['applied']}, rejected {c['rejected']}, kept {c['kept']}"
            for name, c in self.scaling.items()
        )
        return (
            f"llm envs: kept {kept} in {self.seconds:.1f}s; {flow}; scaling: {scaling or 'none'}; "
            f"requests {run.get('requests', 0)} "
            f"(cache hits {run.get('cache_hits', 0)}, repairs {run.get('repairs', 0)}), "
            f"cost ${run.get('cost_usd', 0.0):.4f} this run, "
            f"${self.usage.get('total', {}).get('total_cost_usd', 0.0):.4f} in total"
        )


@dataclass
class BuildResult:
    records: dict[str, list[dict[str, Any]]]
    report: BuildReport
    manifest: dict[str, Any]
    env_set: EnvSet | None = None

    def as_env_records(self) -> EnvRecords:
        manifest = dict(self.env_set.manifest if self.env_set else self.manifest)
        if self.env_set is not None:
            manifest["set"] = self.env_set.ref
            manifest["set_path"] = str(self.env_set.path)
        return EnvRecords(self.records, manifest, self.env_set.path if self.env_set else None)


def _file_sha256(path: str | None) -> str | None:
    if not path:
        return None
    return hashlib.sha256(Path(path).expanduser().read_bytes()).hexdigest()


def default_engine_factory(cfg: LLMBuildConfig, model: str | None = None) -> Callable[[], Any]:
    def create() -> Any:
        from ftrl.llm.engines.openai import OpenAIEngine

        return OpenAIEngine.from_api_config(model or cfg.model, cfg.api, backoff_base_s=cfg.backoff_base_s)

    return create


def _make_llm(
    cfg: LLMBuildConfig, sets_dir: str | Path, engine_factory: Callable[[], Any] | None
) -> tuple[PromptSet, LLMCache, LazyEngine, StructuredLLM]:
    """The prompts, the request cache, the (lazily created) engine and the structured LLM over them."""
    prompts = load_prompts(cfg.prompts_dir, cfg.prompts)
    cache = LLMCache(Path(cfg.cache_dir) if cfg.cache_dir else Path(sets_dir) / ".cache" / "llm")
    engine = LazyEngine(engine_factory or default_engine_factory(cfg))
    llm = StructuredLLM(
        engine,
        cache,
        model=cfg.model,
        repair_prompt=prompts["repair"],
        temperature=cfg.temperature,
        max_tokens=cfg.max_tokens,
        json_mode=cfg.json_mode,
        max_repairs=cfg.max_repairs,
    )
    return prompts, cache, engine, llm


def _knobs(cfg: LLMBuildConfig) -> Knobs:
    return Knobs(
        cfg.functional_generalization,
        cfg.parameter_expansion,
        cfg.parameter_type_generalization,
        cfg.min_distractors,
        cfg.max_distractors,
        cfg.seed,
    )


def _seed_tasks(
    cfg: LLMBuildConfig, ctx: StageContext, report: BuildReport, cache: LLMCache
) -> tuple[list[SeedTask], dict[str, str]]:
    """Seed tasks (file, QA source, topics), near-duplicates removed, and their splits."""
    seeds = read_seed_file(cfg.seed_file) if cfg.seed_file else []
    if cfg.seed_source.kind is not None:
        sourced, failures = read_seed_source(cfg.seed_source)
        report.record("seeds", len(sourced) + len(failures), len(sourced), failures)
        seeds += sourced
    if cfg.topics:
        generated, failures = generate_seeds(cfg.topics, cfg.tasks_per_topic, dict(cfg.scenario_weights), ctx)
        report.record("topics", len(cfg.topics), len(cfg.topics) - len(failures), failures)
        seeds += generated
    if not seeds and not report.failures:
        raise ValueError(
            "envs.llm: no seed tasks; set envs.llm.seed_file (a JSONL of questions), envs.llm.seed_source "
            "(a QA dataset with gold answers) or envs.llm.topics"
        )
    if cfg.max_tasks is not None:
        seeds = seeds[: cfg.max_tasks]
    tasks, duplicates = remove_near_duplicates(seeds, cfg.dedup_threshold)
    report.record("dedup", len(seeds), len(tasks), duplicates)
    splits = {task.task_id: assign_split(task, cfg.test_fraction, cfg.seed) for task in tasks}
    log.info(
        "llm envs: %d seed tasks (%d near-duplicates removed), builder %s at %s, cache %s",
        len(tasks),
        len(duplicates),
        cfg.model,
        cfg.api.base_url,
        cache.root,
    )
    return tasks, splits


def _run_stages(tasks: list[SeedTask], ctx: StageContext, report: BuildReport) -> tuple[Any, dict[str, Any]]:
    """The five builder stages in order; each stage's survivors enter the next.

    Returns the deployed items and, per stage, the items that entered it (the scaling counts need
    the scale stage's input).
    """
    entered: dict[str, Any] = {}
    items: Any = tasks
    for name, stage in (
        ("decompose", decompose),
        ("document", document),
        ("integrate", integrate),
        ("scale", scale),
        ("deploy", deploy),
    ):
        entered[name] = items
        outputs, failures = stage(items, ctx)
        report.record(name, len(items), len(outputs), failures)
        log.info(
            "llm envs: %s %d -> %d%s",
            name,
            len(items),
            len(outputs),
            f" ({dict(Counter(f.reason for f in failures))})" if failures else "",
        )
        items = outputs
    return items, entered


def scaling_counts(
    knobs: Knobs, entered: Sequence[Any], scaled: Sequence[Any], failures: Sequence[StageFailure], kept: Sequence[Any]
) -> dict[str, dict[str, int]]:
    """Per strategy: tasks it was drawn for (entering stage 4), applied to (stage 4 checked it),
    rejected for (stage 4 or the gate blamed it) and kept with it in the set."""
    counts = {name: {"drawn": 0, "applied": 0, "rejected": 0, "kept": 0} for name in STRATEGIES}
    for item in entered:
        for name in knobs.draw(item.scenario.task.task_id)[0]:
            counts[name]["drawn"] += 1
    for item in scaled:
        for name in item.strategies:
            counts[name]["applied"] += 1
    for failure in failures:
        for name in dict.fromkeys(failure.strategies):
            counts[name]["rejected"] += 1
    for item, _ in kept:
        for name in item.toolset.strategies:
            counts[name]["kept"] += 1
    return counts


def provenance(kept: Sequence[Any]) -> list[dict[str, Any]]:
    """Where each kept environment came from: its seed, gold answer, stage-2 tools and how they merged."""
    rows = []
    for item, record in kept:
        toolset = item.toolset
        task = toolset.scenario.task
        rows.append({
            "task_id": task.task_id,
            "split": record["split"],
            "scenario": record["data_source"],
            "origin": task.origin,
            "gold_answer": task.reference_answer,
            "documented_tools": sorted(set(toolset.documented.values())),
            "tools": [tool_name(tool) for tool in toolset.tools],
            "merged_from": toolset.merged_from,
            "distractors": [tool_name(tool) for tool in toolset.distractors],
            "strategies": list(toolset.strategies),
            "probes": len(toolset.probes),
        })
    return rows


def _gate(
    cfg: LLMBuildConfig,
    items: Any,
    splits: dict[str, str],
    cache: LLMCache,
    engine_factory: Callable[[], Any] | None,
    report: BuildReport,
) -> tuple[list[Any], Ledger]:
    """The quality gates, then (if configured) the reference check; the survivors and its ledger."""
    kept, failures = gate_envs(items, splits, cfg.gate_timeout_s)
    report.record("gate", len(items), len(kept), failures)
    reference_ledger = Ledger()
    if cfg.reference_check and kept:
        model = cfg.reference_model or cfg.model
        reference = CachingChatEngine(
            LazyEngine(default_engine_factory(cfg, model) if engine_factory is None else engine_factory),
            cache,
            model,
        )
        verdicts = reference_check(kept, reference, cfg.reference_max_turns, cfg.gate_timeout_s)
        failures = [v for v in verdicts if v is not None]
        entered = len(kept)
        kept = [pair for pair, verdict in zip(kept, verdicts) if verdict is None]
        report.record("reference", entered, len(kept), failures)
        reference_ledger = reference.ledger
    return kept, reference_ledger


def _records_by_split(kept: list[Any]) -> dict[str, list[dict[str, Any]]]:
    records: dict[str, list[dict[str, Any]]] = {split: [] for split in SPLITS}
    for _, record in kept:
        records[record["split"]].append(record)
    return records


def _usage(ctx: StageContext, reference_ledger: Ledger) -> dict[str, Any]:
    """Token, request and cost accounting of this run, in total and per task."""
    total = Ledger()
    for ledger in ctx.ledgers.values():
        total.add(ledger)
    return {
        "this_run": {
            "requests": total.requests + reference_ledger.requests,
            "cache_hits": total.cache_hits + reference_ledger.cache_hits,
            "repairs": total.repairs,
            "local_repairs": total.local_repairs,
            "prompt_tokens": total.prompt_tokens,
            "completion_tokens": total.completion_tokens,
            "cost_usd": round(total.cost_usd, 8),
        },
        "total": {
            "total_prompt_tokens": total.total_prompt_tokens,
            "total_completion_tokens": total.total_completion_tokens,
            "total_cost_usd": round(total.total_cost_usd, 8),
        },
        "per_task": {task_id: ledger.as_dict() for task_id, ledger in sorted(ctx.ledgers.items())},
    }


def _warn_transient(report: BuildReport) -> None:
    transient = [f for f in report.failures if f.transient]
    if transient:
        log.warning(
            "llm envs: %d task(s) failed on the endpoint (%s); re-run to retry them, finished requests "
            "are cached",
            len(transient),
            transient[0].detail[:200],
        )


def _manifest(cfg: LLMBuildConfig, prompts: PromptSet, report: BuildReport) -> dict[str, Any]:
    """The set's manifest: builder model and endpoint, prompt hashes, knobs, seeds, gates, usage, flow."""
    return {
        "source": "llm",
        "builder": {
            "model": cfg.model,
            "base_url": cfg.api.base_url,
            "temperature": cfg.temperature,
            "max_tokens": cfg.max_tokens,
            "json_mode": cfg.json_mode,
            "max_repairs": cfg.max_repairs,
        },
        "prompts": prompts.hashes(),
        "knobs": {
            "functional_generalization": cfg.functional_generalization,
            "parameter_expansion": cfg.parameter_expansion,
            "parameter_type_generalization": cfg.parameter_type_generalization,
            "min_distractors": cfg.min_distractors,
            "max_distractors": cfg.max_distractors,
            "seed": cfg.seed,
        },
        "seeds": {
            "seed_file": cfg.seed_file,
            "seed_file_sha256": _file_sha256(cfg.seed_file),
            "seed_source": asdict(cfg.seed_source),
            "seed_source_sha256": _file_sha256(cfg.seed_source.path)
            if cfg.seed_source.path and Path(cfg.seed_source.path).expanduser().is_file() else None,
            "topics": list(cfg.topics),
            "tasks_per_topic": cfg.tasks_per_topic,
            "test_fraction": cfg.test_fraction,
            "max_tasks": cfg.max_tasks,
        },
        "gates": {
            "dedup_threshold": cfg.dedup_threshold,
            "gate_timeout_s": cfg.gate_timeout_s,
            "reference_check": cfg.reference_check,
            "reference_model": cfg.reference_model or cfg.model,
            "reference_max_turns": cfg.reference_max_turns,
        },
        "scaling": report.scaling,
        "usage": {key: report.usage[key] for key in ("this_run", "total")},
        "build": {
            s.stage: {"entered": s.entered, "passed": s.passed, "failed": s.failed} for s in report.stages
        },
    }


def build_env_set(
    cfg: LLMBuildConfig,
    *,
    sets_dir: str | Path = DEFAULT_SETS_DIR,
    write: bool = True,
    engine_factory: Callable[[], Any] | None = None,
) -> BuildResult:
    """Run the builder on the configured seeds; store the set unless ``write`` is false."""
    started = time.perf_counter()
    prompts, cache, engine, llm = _make_llm(cfg, sets_dir, engine_factory)
    ctx = StageContext(llm, prompts, _knobs(cfg), concurrency=cfg.api.concurrency)
    report = BuildReport()

    tasks, splits = _seed_tasks(cfg, ctx, report, cache)
    items, entered = _run_stages(tasks, ctx, report)
    kept, reference_ledger = _gate(cfg, items, splits, cache, engine_factory, report)
    report.scaling = scaling_counts(
        ctx.knobs, entered.get("scale", []), entered.get("deploy", []), report.failures, kept
    )
    report.envs = provenance(kept)

    records = _records_by_split(kept)
    report.kept = {
        split: dict(sorted(Counter(r["data_source"] for r in rows).items()))
        for split, rows in records.items()
    }
    report.usage = _usage(ctx, reference_ledger)
    if engine.created is not None:
        report.usage["endpoint"] = engine.created.usage.as_dict()
    report.seconds = time.perf_counter() - started
    _warn_transient(report)

    manifest = _manifest(cfg, prompts, report)
    env_set = (
        write_set(records, name=cfg.set_name, sets_dir=sets_dir, manifest=manifest, report=report.as_dict())
        if write
        else None
    )
    log.info(report.summary())
    if env_set is not None:
        log.info("llm envs: stored %s", env_set.path)
    return BuildResult(records, report, manifest, env_set)


def main(argv: Sequence[str] | None = None) -> int:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from ftrl.config import ConfigError, RunConfig
    from ftrl.llm.engines.openai import MissingAPIKeyError

    parser = argparse.ArgumentParser(prog="python -m ftrl.builder", description=__doc__.split("\n")[0])
    parser.add_argument(
        "overrides", nargs="*", help="envs.llm keys, e.g. seed_file=q.jsonl model=gpt-4o-mini"
    )
    parser.add_argument("--sets-dir", default=DEFAULT_SETS_DIR)
    args = parser.parse_args(argv)
    try:
        # `key=` means an empty string (e.g. api.api_key_env= for a server without a key), not null.
        overrides = [f"{item}''" if item.endswith("=") else item for item in args.overrides]
        merged = OmegaConf.merge(OmegaConf.structured(LLMBuildConfig), OmegaConf.from_dotlist(overrides))
        cfg: LLMBuildConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
        run_config = RunConfig()
        run_config.envs.llm = cfg
        run_config.validate()
        result = build_env_set(cfg, sets_dir=args.sets_dir)
    except (ConfigError, ValueError, FileNotFoundError, MissingAPIKeyError, OmegaConfBaseException) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(result.report.summary())
    for failure in result.report.failures:
        print(
            f"  dropped [{failure.stage}/{failure.reason}] {failure.question[:80]!r}: {failure.detail[:160]}"
        )
    if result.env_set is not None:
        print(
            f"stored {result.env_set.path}\ninspect: python -m ftrl.envs.sets --sets-dir {args.sets_dir} "
            f"show {result.env_set.ref}"
        )
    return 0
