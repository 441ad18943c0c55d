"""What every benchmark shares: one-generation evaluation that resumes per sample, and the aggregation.

A benchmark module (``ftrl/eval/<name>.py``) is a loader (data -> sample dicts), a protocol and a
*pure scorer* (sample + conversation -> per-sample metrics). Single-generation protocols (RoTBench,
General, ToolHop's Direct mode) call :func:`generate_once`; multi-turn ones drive
``ftrl.collect.run_episodes`` (ToolHop's tool modes) or their own loop (tau-bench). Both append one
row per finished sample to ``eval/<checkpoint>/<benchmark>.jsonl`` through ``ftrl.collect.EpisodeLog``,
so a killed evaluation continues where it stopped with nothing lost or doubled.

:func:`aggregate` turns rows into the metric keys of ``metrics.json``: ``<prefix>/<group>/<metric>``
per group, ``<prefix>/<metric>`` the mean across groups (not across samples, as ``ftrl_test`` does),
and ``<prefix>/<group>/n``, ``<prefix>/<group>/failed``, ``<prefix>/n``, ``<prefix>/failed``.

    python -m ftrl.run stages=[build_envs,eval] eval.benchmarks=[rotbench] +debug=smoke
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ftrl.collect import EpisodeLog
from ftrl.llm.engines.base import ChatRequest, Generation, SamplingParams
from ftrl.progress import progress as progress_reporter

Row = dict[str, Any]


def sample_key(sample: Mapping[str, Any]) -> str:
    """A stable id of a sample's content (its ``id`` if it has one), for resume checks."""
    if sample.get("id") is not None:
        return str(sample["id"])
    return hashlib.sha1(json.dumps(sample, sort_keys=True, default=str).encode()).hexdigest()[:12]


def generate_once(
    engine: Any,
    samples: Sequence[Mapping[str, Any]],
    out_path: Path,
    *,
    params: SamplingParams,
    request: Callable[[Mapping[str, Any]], ChatRequest],
    score: Callable[[Mapping[str, Any], Generation], Row],
    batch_size: int = 32,
    desc: str = "eval",
) -> list[Row]:
    """One generation per sample, scored at once; returns every sample's row (earlier runs' included).

    ``score(sample, generation)`` returns the row to store: at least ``group`` and ``metrics``
    (a dict of floats); ``failed`` (bool) marks a sample the protocol could not complete.
    """
    log = EpisodeLog(out_path, key=sample_key)
    todo = [(index, sample) for index, sample in enumerate(samples) if not log.check_key(index, sample)]
    bar = progress_reporter(total=len(todo), desc=desc, unit="sample")
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        generations = engine.generate([request(sample) for _, sample in batch], params)
        for (index, sample), outputs in zip(batch, generations):
            row = {"index": index, "id": sample_key(sample), "response": outputs[0].text,
                   **score(sample, outputs[0])}
            log.append(index, sample, [row])
        bar.update(len(batch))
    bar.close()
    rows = log.read()
    if len(rows) != len(samples):
        raise RuntimeError(f"{out_path}: expected {len(samples)} evaluated samples, found {len(rows)}")
    return rows


def aggregate(rows: Sequence[Mapping[str, Any]], prefix: str, metrics: Sequence[str] | None = None) -> dict[str, float]:
    """Per-group means of each metric, then their mean across groups; counts of samples and failures."""
    by_group: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for row in rows:
        by_group[str(row["group"])].append(row)
    names = list(metrics) if metrics is not None else sorted({k for row in rows for k in row["metrics"]})
    result: dict[str, float] = {}
    group_means: dict[str, list[float]] = defaultdict(list)
    for group in sorted(by_group):
        members = by_group[group]
        for name in names:
            values = [float(row["metrics"][name]) for row in members if name in row["metrics"]]
            if values:
                mean = sum(values) / len(values)
                result[f"{prefix}/{group}/{name}"] = mean
                group_means[name].append(mean)
        result[f"{prefix}/{group}/n"] = float(len(members))
        result[f"{prefix}/{group}/failed"] = float(sum(bool(row.get("failed")) for row in members))
    for name, means in group_means.items():
        result[f"{prefix}/{name}"] = sum(means) / len(means)
    result[f"{prefix}/n"] = float(len(rows))
    result[f"{prefix}/failed"] = float(sum(bool(row.get("failed")) for row in rows))
    return result


def cap_per_group(samples: Sequence[Mapping[str, Any]], group: Callable[[Mapping[str, Any]], str],
                  limit: int | None) -> list[Mapping[str, Any]]:
    """The first ``limit`` samples of each group, in order (``eval.max_samples``); all when None."""
    if limit is None:
        return list(samples)
    seen: dict[str, int] = defaultdict(int)
    kept = []
    for sample in samples:
        key = group(sample)
        if seen[key] < limit:
            kept.append(sample)
            seen[key] += 1
    return kept
