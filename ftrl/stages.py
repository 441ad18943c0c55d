"""The stage functions the pipeline calls: each reads and writes files of the run directory only.

    python -m ftrl.run +debug=smoke                          # every stage
    python -m ftrl.run stages=[eval] hydra.run.dir=<run dir>   # re-run one stage on a finished run
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from pathlib import Path
from typing import Any

from ftrl.artifacts import read_json, write_json
from ftrl.llm.tiny import ensure_base_model
from ftrl.registry import BENCHMARKS, ENV_SOURCES
from ftrl.run_state import RunContext, Step

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ shared services
def engine_for(ctx: RunContext, policy: Path | str, batch_size: int) -> Any:
    """An inference engine on ``policy``; the last one is cached so eval reuses collect's engine."""
    from ftrl.llm.engines import build_engine

    if Path(str(policy)) == Path(str(ctx.run_dir.base_model)):
        ensure_base_model(ctx)
    key = ("engine", str(policy))
    if ctx.cache.get("engine_key") != key:
        release_engine(ctx)
        ctx.cache["engine"] = build_engine(ctx.cfg, policy, batch_size=batch_size)
        ctx.cache["engine_key"] = key
    return ctx.cache["engine"]


def release_engine(ctx: RunContext) -> None:
    """Drop the cached engine and free what it holds (a vLLM engine keeps GPU memory until closed)."""
    engine = ctx.cache.pop("engine", None)
    ctx.cache.pop("engine_key", None)
    close = getattr(engine, "close", None)
    if callable(close):
        close()


def read_split(ctx: RunContext, split: str) -> list[dict]:
    from ftrl.envs.io import read_records

    path = ctx.run_dir.envs(split)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run the build_envs stage first (stages=[build_envs,...])")
    return read_records(path)


# ------------------------------------------------------------------------------------ build_envs
def build_envs(ctx: RunContext) -> dict[str, Any]:
    from ftrl.envs.io import env_set_hash, write_jsonl

    cfg = ctx.cfg
    splits = ENV_SOURCES.get(cfg.envs.name)(cfg)
    caps = {"train": cfg.envs.max_train, "test": cfg.envs.max_test}
    for split, cap in caps.items():
        splits.setdefault(split, [])
        if cap is not None:
            splits[split] = splits[split][:cap]
    counts = {split: dict(sorted(Counter(r["data_source"] for r in records).items()))
              for split, records in splits.items()}
    for split, records in splits.items():
        write_jsonl(ctx.run_dir.envs(split), records)
    digest = env_set_hash(splits)
    manifest = {"source": cfg.envs.name, "env_set_hash": digest, "counts": counts}
    source_manifest = getattr(splits, "manifest", None)  # LLM-built / imported sets describe their build
    if source_manifest:
        manifest["source_manifest"] = source_manifest
        manifest["source_path"] = str(getattr(splits, "path", "") or "")
    write_json(ctx.run_dir.envs_manifest, manifest)
    for split, per_scenario in counts.items():
        log.info("envs %s: %d (%s)", split, sum(per_scenario.values()),
                 ", ".join(f"{k}={v}" for k, v in per_scenario.items()))
    return {"env_set_hash": digest, "train": len(splits["train"]), "test": len(splits["test"])}


# ------------------------------------------------------------------------------------ collect
def round_envs(ctx: RunContext, k: int) -> list[dict]:
    """The environments collected in round k: all, or a seeded subset of ``collect.max_envs``."""
    envs = read_split(ctx, "train")
    cap = ctx.cfg.collect.max_envs
    if cap is not None and cap < len(envs):
        chosen = sorted(random.Random(ctx.cfg.seed * 1009 + k).sample(range(len(envs)), cap))
        envs = [envs[i] for i in chosen]
    return envs


def collect(ctx: RunContext, k: int) -> dict[str, Any]:
    from ftrl.collect import collect_snapshots, executor_from_config, parser_from_config
    from ftrl.envs.io import read_records, write_parquet
    from ftrl.llm.engines.base import SamplingParams

    cfg = ctx.cfg
    policy = ctx.policy_for_round(k)
    engine = engine_for(ctx, policy, batch_size=cfg.collect.batch_size)
    params = SamplingParams(temperature=cfg.collect.temperature, top_p=cfg.collect.top_p,
                            max_new_tokens=cfg.max_new_tokens, n=1, seed=cfg.seed * 1009 + k)
    log.info("collect round %d: policy=%s temperature=%s max_turns=%d", k, policy, params.temperature,
             cfg.collect.max_turns)
    stats = collect_snapshots(
        engine, round_envs(ctx, k), ctx.run_dir.snapshots(k), params=params, max_turns=cfg.collect.max_turns,
        parser=parser_from_config(ctx.cfg), execute=executor_from_config(ctx.cfg), batch_size=cfg.collect.batch_size,
        desc=f"collect r{k}",
    )
    write_parquet(ctx.run_dir.snapshots_parquet(k), read_records(ctx.run_dir.snapshots(k)))
    log.info("collect round %d: %s", k, ", ".join(
        f"{key}={value}" if isinstance(value, int) else f"{key}={value:.3g}" for key, value in stats.items()
    ))
    if ctx.tracker is not None:
        ctx.tracker.log({f"collect/{key}": value for key, value in stats.items()})
    return stats


# ------------------------------------------------------------------------------------ train
def warmup(ctx: RunContext) -> dict[str, Any]:
    from ftrl.train.warmup import run_warmup

    release_engine(ctx)
    return run_warmup(ctx, ensure_base_model(ctx))


def train(ctx: RunContext, k: int) -> dict[str, Any]:
    from ftrl.registry import BACKENDS

    release_engine(ctx)  # the trainer (or verl's workers) needs the memory the collection engine holds
    info = BACKENDS.get(ctx.cfg.backend.name)(ctx, k)
    plot_run_rewards(ctx)
    return info


def plot_run_rewards(ctx: RunContext) -> Path | None:
    """Reward curve over every finished round of the run (``train_reward_curve.png``)."""
    from ftrl.analysis.plots import plot_reward_curve
    from ftrl.train.native import read_history

    rows: list[dict[str, Any]] = []
    k = 1
    while ctx.run_dir.train_history(k).exists():
        rows += read_history(ctx.run_dir.train_history(k))
        k += 1
    if not any("reward/score" in row for row in rows):
        return None
    for row in rows:
        row["step"] = row.get("global_step", row["step"])
    path = ctx.run_dir.reward_curve
    plot_reward_curve(rows, path)
    return path


# ------------------------------------------------------------------------------------ eval
def evaluate(ctx: RunContext) -> dict[str, Any]:
    cfg = ctx.cfg
    checkpoints = ctx.checkpoints()
    if cfg.eval.checkpoints == "last":
        checkpoints = checkpoints[-1:]
    all_metrics: dict[str, dict[str, float]] = {}
    if ctx.run_dir.eval_summary.exists():
        all_metrics.update(read_json(ctx.run_dir.eval_summary))
    for name, policy in checkpoints:
        marker = f"eval_{name}"
        if ctx.run_dir.is_done(marker) and ctx.run_dir.eval_metrics(name).exists():
            all_metrics[name] = read_json(ctx.run_dir.eval_metrics(name))
            continue
        engine = engine_for(ctx, policy, batch_size=cfg.eval.batch_size)
        metrics: dict[str, float] = {}
        for benchmark in cfg.eval.benchmarks:
            metrics.update(BENCHMARKS.get(benchmark)(ctx, engine, name))
        write_json(ctx.run_dir.eval_metrics(name), metrics)
        ctx.run_dir.mark_done(marker)
        all_metrics[name] = metrics
        if ctx.tracker is not None:
            ctx.tracker.log({f"eval/{name}/{k}": v for k, v in metrics.items()})
    write_json(ctx.run_dir.eval_summary, all_metrics)
    order = [name for name, _ in ctx.checkpoints() if name in all_metrics]
    summary = {"evals": [{"checkpoint": name, "metrics": all_metrics[name]} for name in order]}
    previous = read_json(ctx.run_dir.summary) if ctx.run_dir.summary.exists() else {}
    previous.update(summary)
    write_json(ctx.run_dir.summary, previous)
    if ctx.tracker is not None and order:
        ctx.tracker.summary(all_metrics[order[-1]])
    return {"checkpoints": order}


# ------------------------------------------------------------------------------------ analyze
def analyze(ctx: RunContext) -> dict[str, Any]:
    from ftrl.analysis.param_delta import analyze_run

    return analyze_run(ctx)


# ------------------------------------------------------------------------------------ dry run
def dry_run_plan(ctx: RunContext, steps: list[Step]) -> dict[str, Any]:
    """Print what a run would do (steps, policies, backend command) without doing it."""
    cfg = ctx.cfg
    lines = [f"run_dir: {ctx.run_dir.root}", f"model: {cfg.model.name} ({cfg.model.path or 'built in run dir'})",
             (f"algorithm: {cfg.algorithm.name}  reward: {cfg.reward.name}/{cfg.reward.compat}  "
             f"freeze: {cfg.freeze.name}  backend: {cfg.backend.name}"), "steps:"]
    for step in steps:
        state = "done" if ctx.run_dir.is_done(step.name) else "todo"
        lines.append(f"  [{state}] {step.name}: {step.describe}")
    plan = {"run_dir": str(ctx.run_dir.root), "steps": [s.name for s in steps]}
    if cfg.backend.name == "verl" and "train" in cfg.stages:
        from ftrl.train.verl_backend import verl_command

        command = verl_command(ctx, 1)
        lines.append("verl command (round 1):")
        lines.append("  " + " \\\n    ".join(command))
        plan["verl_command"] = command
    print("\n".join(lines))
    return plan
