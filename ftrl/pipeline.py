"""Ordered stages with skip-if-done markers: build_envs -> [warmup] -> (collect -> train) x rounds -> eval -> analyze
[-> intervene, when asked for].

Each step writes its outputs under the run directory (``ftrl.artifacts.RunDir``) and then a marker
``stages/<step>.json``; a step with a marker is skipped, so re-running the same command after a crash
resumes where it stopped. Steps inside a stage (``collect_r2``, ``eval_round1``) keep their own
markers and their own resume logic (collection appends episode by episode; training checkpoints).

    python -m ftrl.run stages=[build_envs,collect] +debug=smoke
"""

from __future__ import annotations

import logging
import time
from typing import Any

from omegaconf import OmegaConf

from ftrl import stages as S
from ftrl.artifacts import RunDir, atomic_write_text, read_json, write_json, write_manifest
from ftrl.config import RunConfig, to_container
from ftrl.inputs import input_fingerprints, preflight, require_inputs
from ftrl.run_state import RunContext, Step

log = logging.getLogger(__name__)


def build_steps(ctx: RunContext) -> list[Step]:
    """The step table for this config; later stages slot in without reshaping the earlier ones."""
    stages = ctx.cfg.stages
    steps: list[Step] = []
    if "build_envs" in stages:
        steps.append(Step("build_envs", "build_envs", S.build_envs, "build or load environments"))
    if ctx.warm_start_enabled():
        steps.append(Step("warmup", "train", S.warmup, "supervised warm start on gold trajectories"))
    for k in range(1, ctx.rounds() + 1):
        if "collect" in stages:
            steps.append(Step(f"collect_r{k}", "collect", lambda c, k=k: S.collect(c, k), f"round {k}: snapshots"))
        if "train" in stages:
            steps.append(Step(f"train_r{k}", "train", lambda c, k=k: S.train(c, k), f"round {k}: RL update"))
    if "eval" in stages:
        steps.append(Step("eval", "eval", S.evaluate, "evaluate checkpoints", recheck=True))
    if "analyze" in stages:
        steps.append(Step("analyze", "analyze", S.analyze, "parameter-change analysis"))
    if "intervene" in stages:
        steps.append(Step("intervene", "intervene", S.intervene, "revert / transplant parameter selections, evaluate",
                          recheck=True))
    return steps


def run_pipeline(cfg: RunConfig, tracker: Any = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """Run (or resume) every step of ``cfg``; return the summary written to ``summary.json``.

    Before any step: the run directory must accept the config and its inputs (same identity, same
    input contents), and every input a pending stage reads must exist. ``overrides`` (the command
    line) are recorded with the config when the run directory is created.
    """
    run_dir = RunDir(cfg.run_dir)
    run_dir.root.mkdir(parents=True, exist_ok=True)
    created = not run_dir.manifest.exists()
    write_manifest(run_dir, to_container(cfg), inputs=input_fingerprints(cfg))
    if created or not run_dir.recorded_config.exists():
        record_config(run_dir, cfg, overrides)
    ctx = RunContext(cfg=cfg, run_dir=run_dir, tracker=tracker)
    steps = build_steps(ctx)
    log.info("run_dir=%s steps=%s", run_dir.root, [s.name for s in steps])
    done = {step.name for step in steps if run_dir.is_done(step.name)}
    if cfg.dry_run:
        return S.dry_run_plan(ctx, steps, preflight(cfg, done))
    require_inputs(cfg, done)

    for step in steps:
        if step.stage in cfg.rerun and run_dir.is_done(step.name):
            log.info("rerun %s (rerun=%s)", step.name, list(cfg.rerun))
        elif run_dir.is_done(step.name) and not step.recheck:
            log.info("skip %s (done: %s)", step.name, run_dir.stage_marker(step.name))
            continue
        log.info("=== %s: %s", step.name, step.describe)
        started = time.time()
        info = step.run(ctx) or {}
        run_dir.mark_done(step.name, info=info, wall_seconds=round(time.time() - started, 2))
        ctx.steps_run.append(step.name)
    summary = read_json(run_dir.summary) if run_dir.summary.exists() else {"evals": []}
    summary["run_dir"] = str(run_dir.root)
    summary["steps_run"] = list(ctx.steps_run)
    write_json(run_dir.summary, summary)
    return summary


def record_config(run_dir: RunDir, cfg: RunConfig, overrides: list[str] | None) -> None:
    """``.hydra/config.yaml`` (the validated config) and ``overrides.yaml`` of the invocation that made the run."""
    atomic_write_text(run_dir.recorded_config, OmegaConf.to_yaml(OmegaConf.create(to_container(cfg))))
    atomic_write_text(run_dir.recorded_overrides, OmegaConf.to_yaml(OmegaConf.create(list(overrides or []))))
