"""Own-test evaluation: the reference multi-turn protocol and Solve-P / Solve-R / Solve-F1.

Greedy decoding, at most ``eval.max_turns`` turns, stop at the first turn without calls. Per sample
(reference definitions): Solve-P = solved / calls (1.0 when the episode made no call), Solve-R =
solved / total sub-answers, Solve-F1 = 2 * solved / (calls + total). Metrics are averaged per
scenario (``data_source``), then across scenarios. Per-sample records (conversation + metrics, the
reference's evaluation output shape) are appended as each episode ends, so evaluation resumes.

    python -m ftrl.run stages=[build_envs,eval] +debug=smoke
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ftrl.collect import Episode, EpisodeLog, run_episodes
from ftrl.run_state import RunContext

log = logging.getLogger(__name__)

METRIC_NAMES = {"solve_precision": "solve_p", "solve_rate": "solve_r", "solve_f1": "solve_f1"}


def aggregate_by_scenario(rows: Sequence[Mapping[str, Any]], prefix: str = "ftrl_test") -> dict[str, float]:
    """Average each metric per scenario, then across scenarios (the paper's per-dataset average)."""
    by_scenario: dict[str, list[Mapping[str, float]]] = defaultdict(list)
    for row in rows:
        by_scenario[row["data_source"]].append(row["metrics"])
    result: dict[str, float] = {}
    scenario_means: dict[str, list[float]] = defaultdict(list)
    for scenario in sorted(by_scenario):
        samples = by_scenario[scenario]
        for long_name, short_name in METRIC_NAMES.items():
            mean = sum(m[long_name] for m in samples) / len(samples)
            result[f"{prefix}/{scenario}/{short_name}"] = mean
            scenario_means[short_name].append(mean)
        result[f"{prefix}/{scenario}/n"] = float(len(samples))
    for short_name, means in scenario_means.items():
        result[f"{prefix}/{short_name}"] = sum(means) / len(means)
    result[f"{prefix}/n"] = float(len(rows))
    return result


def evaluate_own_test(
    engine: Any,
    records: Sequence[Mapping[str, Any]],
    out_path: Path,
    *,
    params: Any,
    max_turns: int,
    parser: Any,
    execute: Any,
    batch_size: int = 32,
    model_name: str = "",
    desc: str = "eval ftrl_test",
) -> dict[str, float]:
    """Play the test environments and return the aggregated metrics; rows go to ``out_path``."""
    episode_log = EpisodeLog(out_path)
    todo = [(i, record) for i, record in enumerate(records) if not episode_log.check_key(i, record)]

    def on_done(episode: Episode) -> None:
        row = {
            "index": episode.index,
            "messages": episode.messages,
            "data_source": episode.sample.data_source,
            "model": model_name,
            "metrics": episode.metrics(),
            "calls": episode.calls,
            "solved": episode.solved,
            "total": episode.total,
            "turns": episode.turns,
            "ended_by": episode.ended_by,  # "context": the conversation filled the context window
        }
        episode_log.append(episode.index, episode.record, [row])

    run_episodes(engine, todo, params=params, max_turns=max_turns, parser=parser, execute=execute,
                 on_done=on_done, batch_size=batch_size, desc=desc)
    rows = episode_log.read()
    if len(rows) != len(records):
        raise RuntimeError(f"{out_path}: expected {len(records)} evaluated samples, found {len(rows)}")
    return aggregate_by_scenario(rows)


def ftrl_test(ctx: RunContext, engine: Any, checkpoint: str) -> dict[str, float]:
    """Benchmark entry (``eval.benchmarks: [ftrl_test]``): the run's own test split."""
    from ftrl.collect import executor_from_config, parser_from_config
    from ftrl.envs.io import read_records
    from ftrl.llm.engines.base import SamplingParams

    cfg = ctx.cfg
    test_path = ctx.run_dir.envs("test")
    if not test_path.exists():
        raise FileNotFoundError(f"{test_path} is missing: run the build_envs stage first")
    records = read_records(test_path)
    if cfg.eval.max_samples is not None:
        records = records[: cfg.eval.max_samples]
    if not records:
        raise ValueError(f"{test_path} holds no test environments to evaluate")
    params = SamplingParams(temperature=cfg.eval.temperature, top_p=1.0, max_new_tokens=cfg.max_new_tokens,
                            repetition_penalty=cfg.eval.repetition_penalty, inherit=cfg.eval.inherit,
                            n=1, seed=cfg.seed)
    return evaluate_own_test(
        engine, records, ctx.run_dir.eval_records(checkpoint, "ftrl_test"), params=params,
        max_turns=cfg.eval.max_turns, parser=parser_from_config(cfg), execute=executor_from_config(cfg),
        batch_size=cfg.eval.batch_size, model_name=checkpoint, desc=f"eval {checkpoint}",
    )
