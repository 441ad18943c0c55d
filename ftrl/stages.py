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

from ftrl.artifacts import RunDir, read_json, write_json
from ftrl.config import RunConfig
from ftrl.errors import ConfigError, MissingInputError
from ftrl.llm.tiny import ensure_base_model
from ftrl.registry import BENCHMARKS, ENV_SOURCES
from ftrl.run_state import RunContext, Step
from ftrl.tracking import eval_summary

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
    gate_report = gate_envs(ctx, splits)
    counts = {split: dict(sorted(Counter(r["data_source"] for r in records).items()))
              for split, records in splits.items()}
    for split, records in splits.items():
        write_jsonl(ctx.run_dir.envs(split), records)
    digest = env_set_hash(splits)
    manifest = {"source": cfg.envs.name, "env_set_hash": digest, "counts": counts, "gate": gate_report.as_dict()}
    source_manifest = getattr(splits, "manifest", None)  # LLM-built / imported sets describe their build
    if source_manifest:
        manifest["source_manifest"] = source_manifest
        manifest["source_path"] = str(getattr(splits, "path", "") or "")
    write_json(ctx.run_dir.envs_manifest, manifest)
    for split, per_scenario in counts.items():
        log.info("envs %s: %d (%s)", split, sum(per_scenario.values()),
                 ", ".join(f"{k}={v}" for k, v in per_scenario.items()))
    return {"env_set_hash": digest, "train": len(splits["train"]), "test": len(splits["test"])}


def gate_envs(ctx: RunContext, splits: dict[str, list[dict]]) -> Any:
    """Pass every source's records through ``ftrl.envs.gate`` (in place), then refuse an empty needed split."""
    from ftrl.envs.executor import executor_from_config
    from ftrl.envs.gate import check_needed_splits, gate_records

    cfg = ctx.cfg
    kept, report = gate_records(splits, timeout=cfg.reward.tool_timeout_s, invalid=cfg.envs.invalid,
                                locations=getattr(splits, "locations", None), executor=executor_from_config(cfg))
    splits.update(kept)
    (log.warning if sum(report.dropped.values()) else log.info)("%s", report.summary())
    stages = cfg.stages
    needed = {}
    if ctx.warm_start_enabled() or "collect" in stages or "train" in stages:
        needed["train"] = "stages " + "/".join(s for s in ("collect", "train") if s in stages)
    if "eval" in stages and "ftrl_test" in cfg.eval.benchmarks:
        needed["test"] = "eval (benchmark ftrl_test)"
    files = {"train": cfg.envs.files.train, "test": cfg.envs.files.test} if cfg.envs.name == "ftrl_files" else {}
    origins = {split: f"envs.files.{split}='{path}'" if path else f"envs=ftrl_files (envs.files.{split} unset)"
               for split, path in files.items()} or {split: f"envs={cfg.envs.name}" for split in ("train", "test")}
    check_needed_splits(splits, needed, origins, report)
    if ctx.warm_start_enabled() and not any(record.get("gold_calls") for record in splits.get("train", [])):
        raise ConfigError(f"model.warm_start=true learns from gold trajectories, but no train environment of "
                          f"{origins['train']} has gold_calls (the FTRL release's files have none); set "
                          f"model.warm_start=false or use environments with gold calls")
    return report


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
                            max_new_tokens=cfg.max_new_tokens, n=1, seed=cfg.seed * 1009 + k,
                            top_k=cfg.collect.top_k, repetition_penalty=cfg.collect.repetition_penalty,
                            inherit=cfg.collect.inherit)
    log.info("collect round %d: policy=%s temperature=%s max_turns=%d", k, policy, params.temperature,
             cfg.collect.max_turns)
    from ftrl.envs.sandbox import get_sandbox

    execute = executor_from_config(ctx.cfg)
    cut_before = get_sandbox().stats.get("outputs_cut", 0)
    stats = collect_snapshots(
        engine, round_envs(ctx, k), ctx.run_dir.snapshots(k), params=params, max_turns=cfg.collect.max_turns,
        parser=parser_from_config(ctx.cfg), execute=execute, batch_size=cfg.collect.batch_size,
        desc=f"collect r{k}",
    )
    # Tool outputs cut at reward.max_tool_output_chars (none under compat=ftrl unless set).
    stats["tool_outputs_cut"] = get_sandbox().stats.get("outputs_cut", 0) - cut_before
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
    record_monitor(ctx, k, info)
    return info


def record_monitor(ctx: RunContext, k: int, info: dict[str, Any]) -> None:
    """``summary.json`` says whether and when the hacking monitor fired, over every round so far."""
    alarms: list[dict[str, Any]] = []
    for j in range(1, k):
        marker = ctx.run_dir.stage_marker(f"train_r{j}")
        if marker.exists():
            alarms += (read_json(marker).get("info") or {}).get("monitor_alarms", [])
    alarms += info.get("monitor_alarms", [])
    summary = read_json(ctx.run_dir.summary) if ctx.run_dir.summary.exists() else {}
    summary["hacking_monitor"] = {"fired": bool(alarms), "alarms": alarms}
    write_json(ctx.run_dir.summary, summary)


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
    plot_reward_curve(rows, path, reward_name=ctx.cfg.reward.name)
    return path


# ------------------------------------------------------------------------------------ eval
# Eval keys that do not change results: which checkpoints to evaluate, and how many conversations
# share a forward pass (greedy decoding; padding may move a last float digit, not a metric).
_EVAL_KEYS_WITHOUT_EFFECT = ("name", "checkpoints", "batch_size")
# Per-benchmark settings sections: they matter only when that benchmark is evaluated.
_BENCHMARK_SECTIONS = ("toolhop", "taubench", "rotbench", "general", "bfcl")
# Eval keys added after results were first recorded, with the value those results were made with.
_EVAL_KEYS_ADDED: dict[str, Any] = {"repetition_penalty": 1.0, "inherit": False}


def eval_settings(cfg: RunConfig) -> dict[str, Any]:
    """The settings an evaluation result is only valid for (recorded next to it as ``settings.json``)."""
    from ftrl.config import to_container

    section = to_container(cfg)["eval"]
    unused = {name for name in _BENCHMARK_SECTIONS if name not in cfg.eval.benchmarks}
    return {k: v for k, v in section.items() if k not in _EVAL_KEYS_WITHOUT_EFFECT and k not in unused}


def _fresh_eval(ctx: RunContext, name: str, settings: dict[str, Any]) -> bool:
    """Whether checkpoint ``name`` has finished results made with ``settings``.

    Results (finished or partial) made with other settings, or any when ``rerun=[eval]``, are moved
    to ``eval/archive/``; partial results made with the same settings stay, and evaluation resumes them.
    """
    rd = ctx.run_dir
    folder = rd.eval_metrics(name).parent
    has_results = rd.is_done(f"eval_{name}") and rd.eval_metrics(name).exists()
    recorded = read_json(rd.eval_settings(name)) if rd.eval_settings(name).exists() else None
    if recorded is not None:  # settings added later, at the value results made before them were made with
        recorded = {**_EVAL_KEYS_ADDED, **recorded}
    if has_results and recorded is None:  # made before settings were recorded: assume the current ones
        log.warning("eval %s: results recorded no settings; taking them as made with %s", name, settings)
        write_json(rd.eval_settings(name), settings)
        recorded = settings
    if recorded == settings and "eval" not in ctx.cfg.rerun:
        return has_results  # not finished: the benchmark resumes its records sample by sample
    if folder.exists() and any(folder.iterdir()):
        archive = rd.eval_archive(name)
        archive.parent.mkdir(parents=True, exist_ok=True)
        folder.rename(archive)
        reason = "rerun=[eval]" if recorded == settings else f"settings changed: {_settings_diff(recorded, settings)}"
        log.info("eval %s: evaluating again (%s); earlier results moved to %s", name, reason, archive)
    rd.stage_marker(f"eval_{name}").unlink(missing_ok=True)
    return False  # "eval" in rerun with nothing recorded yet also lands here


def _settings_diff(old: dict[str, Any] | None, new: dict[str, Any]) -> str:
    if old is None:
        return "none recorded"
    return ", ".join(f"eval.{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
                     if old.get(k) != new.get(k))


def evaluate(ctx: RunContext) -> dict[str, Any]:
    """Evaluate every checkpoint that has no result made with the current eval settings.

    A result made with other settings (``eval.max_samples``, ``eval.temperature``, benchmarks, ...)
    is moved to ``eval/archive/`` and the checkpoint is evaluated again; ``rerun=[eval]`` forces it.
    The summary and table show only results made with the current settings.
    """
    cfg, rd = ctx.cfg, ctx.run_dir
    settings = eval_settings(cfg)
    checkpoints = ctx.checkpoints()
    if cfg.eval.checkpoints == "last":
        checkpoints = checkpoints[-1:]
    chosen = {name for name, _ in checkpoints}
    all_metrics: dict[str, dict[str, float]] = {}
    for name, policy in ctx.checkpoints():
        if name not in chosen:  # keep other checkpoints' results only if they match the settings
            if rd.eval_settings(name).exists() and read_json(rd.eval_settings(name)) == settings:
                all_metrics[name] = read_json(rd.eval_metrics(name))
            continue
        if _fresh_eval(ctx, name, settings):
            all_metrics[name] = read_json(rd.eval_metrics(name))
            continue
        write_json(rd.eval_settings(name), settings)  # first, so a killed evaluation resumes only under them
        engine = engine_for(ctx, policy, batch_size=cfg.eval.batch_size)
        metrics: dict[str, float] = {}
        for benchmark in cfg.eval.benchmarks:
            metrics.update(BENCHMARKS.get(benchmark)(ctx, engine, name))
        write_json(rd.eval_metrics(name), metrics)
        rd.mark_done(f"eval_{name}")
        all_metrics[name] = metrics
        if ctx.tracker is not None:
            ctx.tracker.log({f"eval/{name}/{k}": v for k, v in metrics.items()})
    write_json(rd.eval_summary, all_metrics)
    order = [name for name, _ in ctx.checkpoints() if name in all_metrics]
    summary = read_json(rd.summary) if rd.summary.exists() else {}
    summary.update({"evals": [{"checkpoint": name, "metrics": all_metrics[name]} for name in order],
                    "eval_settings": settings})
    write_json(rd.summary, summary)
    if ctx.tracker is not None and order:
        ctx.tracker.summary(eval_summary({name: all_metrics[name] for name in order}))
    return {"checkpoints": order}


# ------------------------------------------------------------------------------------ analyze
def analyze(ctx: RunContext) -> dict[str, Any]:
    from ftrl.analysis.param_delta import analyze_run

    return analyze_run(ctx)


# ------------------------------------------------------------------------------------ intervene
def evaluate_policy(ctx: RunContext, run_dir: RunDir, name: str, policy: Path | str) -> dict[str, float]:
    """``eval.benchmarks`` on ``policy`` under the label ``name``; records go under ``run_dir.eval_dir``."""
    view = RunContext(cfg=ctx.cfg, run_dir=run_dir, tracker=None, cache=ctx.cache)
    engine = engine_for(view, policy, batch_size=ctx.cfg.eval.batch_size)
    metrics: dict[str, float] = {}
    for benchmark in ctx.cfg.eval.benchmarks:
        metrics.update(BENCHMARKS.get(benchmark)(view, engine, name))
    return metrics


def intervene(ctx: RunContext) -> dict[str, Any]:
    """Revert / transplant parameter selections between B and T and evaluate each (ftrl.analysis.intervene)."""
    from ftrl.analysis.intervene.stage import run_interventions

    release_engine(ctx)
    return run_interventions(ctx, evaluate=lambda run_dir, name, policy: evaluate_policy(ctx, run_dir, name, policy),
                             release=lambda: release_engine(ctx), settings=eval_settings(ctx.cfg))


# ------------------------------------------------------------------------------------ dry run
def dry_run_plan(ctx: RunContext, steps: list[Step], problems: list[str]) -> dict[str, Any]:
    """Print what a run would do (steps, inputs, backend command) without doing it.

    ``problems`` are the preflight's missing inputs: they are listed, and the dry run then fails
    (exit code 2) so a script can use ``dry_run=true`` as a check before submitting a job.
    """
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
    lines += _input_lines(ctx.cfg, problems)
    print("\n".join(lines))
    if problems:
        raise MissingInputError(f"dry run: {len(problems)} missing input(s): " + "; ".join(problems))
    return plan


def _input_lines(cfg: RunConfig, problems: list[str]) -> list[str]:
    from ftrl.inputs import run_inputs

    lines = ["inputs:"]
    for item in run_inputs(cfg):
        problem = next((p for p in problems if p.startswith(item.key + ":")), None)
        where = f"${item.path}" if item.kind == "api_key" else item.path
        state = "missing" if problem else ("hub" if item.kind == "model" and item.hub_ok else "ok")
        lines.append(f"  [{state}] {item.key}: {where} (read by {item.stage})" + (f" -- {problem}" if problem else ""))
    if len(lines) == 1:
        lines.append("  (none outside the run directory)")
    return lines
