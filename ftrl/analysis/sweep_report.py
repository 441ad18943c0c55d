"""What a sweep writes when it ends: the table of its jobs, and the comparison of its ablation arms.

A Hydra callback (registered in conf/config.yaml, hydra.callbacks): at the end of a multirun
(``python -m ftrl.run -m ...``) the sweep's jobs are gathered into

* ``<sweep dir>/sweep_table.md`` and ``.csv``: one row per job, the swept keys as columns
  (``ftrl.analysis.tables.sweep_table``);
* ``<sweep dir>/comparison/``: one comparison of the arms of an ablation (:func:`write_sweep_comparison`).
  Jobs that differ only in ``seed`` form one arm (mean ± sample standard deviation over seeds). Per arm:
  the trainable parameters under its freeze policy (counted from a checkpoint's tensor names and sizes
  with the policy's selector) and their share of the model; per own-test / Table 2 metric the RL start
  (``warmup``, else ``base``), the last round and the gain; where the squared weight change of the RL
  update sits (layers 0-2 MLP, the paper's finding; the lower-half MLP, our extension). ``comparison.md``
  and ``.csv`` (arms), ``jobs.csv`` (jobs), and ``heatmaps.png``: every job's layer x module heat-map of
  the relative change RL start -> last round, side by side on ONE colour scale (frozen cells are 0). The
  heat-map cells are computed from the checkpoints (streamed; cached in ``comparison/cells/``).

Both paths are printed. ``python -m ftrl.report sweep <sweep dir>`` rebuilds them. A failure here is
logged and never fails the sweep, whose jobs are done.

    python -m ftrl.run -m +experiment=tiny_freeze_ablation
    python -m ftrl.report sweep outputs/multirun/tiny_freeze_ablation
"""

from __future__ import annotations

import csv
import json
import logging
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)

COMPARISON_DIR = "comparison"
PAPER_LAYERS = range(3)  # the paper's finding: the MLPs of layers 0-2
MLP = ("gate_proj", "up_proj", "down_proj")
_FAILURES = (OSError, ValueError, KeyError, TypeError, IndexError, yaml.YAMLError)


class SweepReport(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from ftrl.analysis.tables import write_sweep_table

        sweep_dir = config.hydra.sweep.dir
        reports = [("sweep table", write_sweep_table)]
        if not config.get("dry_run", False):  # a dry run's jobs wrote plans, nothing to compare
            reports.append(("sweep comparison", write_sweep_comparison))
        for what, write in reports:
            try:
                path = write(sweep_dir)
            # the jobs are done: a report that cannot be made (unreadable job files) must not fail the sweep
            except _FAILURES as error:
                log.warning("%s for %s not written: %s (rebuild: python -m ftrl.report sweep %s)", what, sweep_dir,
                            error, sweep_dir)
                continue
            print(f"{what}: {path}  (rebuild: python -m ftrl.report sweep {sweep_dir})", flush=True)


# ------------------------------------------------------------------------------ one job
@dataclass
class Job:
    """What the comparison reads of one job directory."""

    path: Path
    arm: tuple[tuple[str, str], ...]  # the swept keys except seed, and their values
    seed: str
    status: str  # the last evaluated checkpoint, or why there is none
    start: dict[str, float] = field(default_factory=dict)  # metrics of the RL start (warmup, else base)
    last: dict[str, float] = field(default_factory=dict)   # metrics of the last round
    trainable: int | None = None
    total: int | None = None
    cells: dict[tuple[int | None, str | None], tuple[float, float]] | None = None  # (delta_sq, base_sq)
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return " ".join([*(f"{k}={v}" for k, v in self.arm), f"seed={self.seed}"])


def _checkpoint_dirs(job: Path, config: Mapping[str, Any]) -> tuple[Path | None, Path | None]:
    """The job's RL start (warmup, else its base model) and last round checkpoints, where they exist."""
    def complete(path: Path) -> bool:
        return (path / "config.json").is_file() and any(path.glob("*.safetensors"))

    rounds = sorted((int(p.parent.name[1:]), p) for p in job.glob("rounds/r*/checkpoint")
                    if p.parent.name[1:].isdigit() and complete(p))
    starts = [job / "warmup" / "checkpoint", job / "model" / "base"]
    model_path = (config.get("model") or {}).get("path")
    if model_path:  # a local directory, or a hub id in the local Hugging Face cache
        from ftrl.analysis.param_delta import CheckpointError, resolve_checkpoint

        try:
            starts.append(resolve_checkpoint(model_path))
        except CheckpointError:
            pass
    start = next((p for p in starts if complete(p)), None)
    return start, (rounds[-1][1] if rounds else None)


def _cells(job: Path, start: Path, last: Path, cache_dir: Path) -> dict[tuple[int | None, str | None], tuple[float, float]]:
    """Squared change and squared base norm per (layer, module) cell, RL start -> last round (cached)."""
    from ftrl.analysis.param_delta import aggregate, compare_checkpoints

    cache = cache_dir / f"{job.name}.json"
    stamp = {"start": str(start.resolve()), "last": str(last.resolve()),
             "mtime": max(p.stat().st_mtime for p in [*start.glob("*.safetensors"), *last.glob("*.safetensors")])}
    if cache.is_file():
        saved = json.loads(cache.read_text(encoding="utf-8"))
        if saved.get("stamp") == stamp:
            return {(layer, module): (d, b) for layer, module, d, b in saved["cells"]}
    cells = aggregate(compare_checkpoints(start, last).rows).cells
    out = {key: (group.delta_sq, group.base_sq) for key, group in cells.items()}
    from ftrl.artifacts import write_json

    write_json(cache, {"stamp": stamp, "cells": [[k[0], k[1], d, b] for k, (d, b) in out.items()]})
    return out


def _trainable(config: Mapping[str, Any], checkpoint: Path | None) -> tuple[int | None, int | None, str | None]:
    """Trainable and total parameters under the job's freeze policy, or None with the reason."""
    from ftrl.analysis.intervene.build import read_layout
    from ftrl.analysis.intervene.selection import num_layers_for, trainable_parameters

    if ((config.get("peft") or {}).get("name") or "none") != "none":
        return None, None, "LoRA: the trainable adapters are not in a merged checkpoint"
    if checkpoint is None:
        return None, None, "no checkpoint to count parameters in"
    layout = read_layout(checkpoint)
    numels = layout.numels()
    trainable, total = trainable_parameters(config.get("freeze") or {}, numels,
                                            num_layers_for(checkpoint, list(numels)))
    return trainable, total, None


def load_job(path: Path, swept: Sequence[str], cache_dir: Path, heatmaps: bool = True) -> Job:
    from ftrl.analysis.tables import _last_round, _overrides, load_run

    run = load_run(path)
    overrides = _overrides(path)
    arm = tuple((key, overrides.get(key, "")) for key in swept if key != "seed")
    seed = overrides.get("seed", str(run.config.get("seed", "")))
    last_name = _last_round(run) or (list(run.evals)[-1] if run.evals else None)
    start_name = "warmup" if "warmup" in run.evals else ("base" if "base" in run.evals else None)
    status = last_name or ("unfinished" if run.summary is None else "no eval")
    job = Job(path, arm, seed, status, dict(run.evals.get(start_name, {}) if start_name else {}),
              dict(run.evals.get(last_name, {}) if last_name else {}))
    start, last = _checkpoint_dirs(path, run.config)
    job.trainable, job.total, note = _trainable(run.config, last or start)
    if note:
        job.notes.append(note)
    if heatmaps and start is not None and last is not None:
        job.cells = _cells(path, start, last, cache_dir)
    elif heatmaps:
        job.notes.append("no heat-map: the RL start or the last round checkpoint is missing")
    return job


# ------------------------------------------------------------------------------ columns and arms
@dataclass(frozen=True)
class Column:
    """One number per job: its header, CSV name, how to read it from a job, and how to show it."""

    header: str
    name: str
    value: Any  # Callable[[Job], float | None]
    percent: bool = True  # shown x100 with two decimals (else as an integer count)


def _share(job: Job, pick: Any) -> float | None:
    """Share of the job's squared weight change held by the cells ``pick(layer, module, depth)`` selects."""
    if not job.cells:
        return None
    depth = 1 + max((layer for layer, _ in job.cells if layer is not None), default=-1)
    total = sum(delta for delta, _ in job.cells.values())
    part = sum(delta for (layer, module), (delta, _) in job.cells.items() if pick(layer, module, depth))
    return part / total if total > 0 else 0.0


def comparison_columns(jobs: Sequence[Job]) -> list[Column]:
    from ftrl.analysis.tables import COLUMNS

    columns = [Column("trainable params", "trainable_params", lambda j: j.trainable, percent=False),
               Column("trainable %", "trainable_share", lambda j: None if not j.total else j.trainable / j.total)]
    for _, key, label in COLUMNS:
        if not any(key in job.last for job in jobs):
            continue
        columns += [Column(f"{label} start", f"{key}:start", lambda j, k=key: j.start.get(k)),
                    Column(f"{label} last", f"{key}:last", lambda j, k=key: j.last.get(k)),
                    Column(f"{label} gain", f"{key}:gain", lambda j, k=key: None if k not in j.last or k not in j.start
                           else j.last[k] - j.start[k])]
    columns += [
        Column("Δ² L0-2 MLP %", "delta_share_layers_0_2_mlp",
               lambda j: _share(j, lambda layer, module, depth: layer in PAPER_LAYERS and module in MLP)),
        Column("Δ² lower-half MLP %", "delta_share_lower_half_mlp",
               lambda j: _share(j, lambda layer, module, depth: layer is not None and layer < (depth + 1) // 2
                                and module in MLP)),
    ]
    return columns


def _stats(values: Sequence[float]) -> tuple[float | None, float | None, int]:
    if not values:
        return None, None, 0
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None), len(values)


def _show(mean: float | None, std: float | None, count: int, jobs: int, column: Column) -> str:
    from ftrl.analysis.tables import MISSING

    if mean is None:
        return MISSING
    scale, digits = (100.0, 2) if column.percent else (1.0, 0)
    text = f"{scale * mean:,.{digits}f}"
    if std is not None:
        text += f" ± {scale * std:,.{digits}f}"
    return text + (f" (n={count})" if count < jobs else "")


@dataclass
class Comparison:
    keys: list[str]  # the swept keys that name an arm (not seed)
    jobs: list[Job]
    arms: dict[tuple[tuple[str, str], ...], list[Job]]
    columns: list[Column]

    def arm_rows(self) -> tuple[list[str], list[list[str]]]:
        header = [*self.keys, "seeds", *(c.header for c in self.columns)]
        body = []
        for arm, members in self.arms.items():
            cells = []
            for column in self.columns:
                values = [v for v in (column.value(job) for job in members) if v is not None]
                cells.append(_show(*_stats(values), len(members), column))
            body.append([*(value for _, value in arm), ",".join(job.seed for job in members), *cells])
        return header, body

    def job_rows(self) -> tuple[list[str], list[list[str]]]:
        header = ["job", *self.keys, "seed", "checkpoint", *(c.header for c in self.columns)]
        body = [[job.path.name, *(value for _, value in job.arm), job.seed, job.status,
                 *(_show(job_value, None, 1, 1, c) for c in self.columns for job_value in [c.value(job)])]
                for job in self.jobs]
        return header, body


def sweep_comparison(sweep_dir: str | Path, heatmaps: bool = True) -> Comparison:
    """Read every job of ``sweep_dir``; arms are the jobs with equal swept keys other than ``seed``."""
    from ftrl.analysis.tables import _is_run_dir, _overrides

    sweep_dir = Path(sweep_dir)
    paths = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and _is_run_dir(p)) if sweep_dir.is_dir() else []
    overrides = {path: _overrides(path) for path in paths}
    keys: list[str] = []
    for ov in overrides.values():
        keys += [k for k in ov if k not in keys]
    swept = [k for k in keys if len({ov.get(k) for ov in overrides.values()}) > 1] or keys
    jobs = [load_job(path, swept, sweep_dir / COMPARISON_DIR / "cells", heatmaps) for path in paths]
    jobs.sort(key=lambda job: (job.arm, _seed_order(job.seed)))
    arms: dict[tuple[tuple[str, str], ...], list[Job]] = {}
    for job in jobs:
        arms.setdefault(job.arm, []).append(job)
    return Comparison([k for k in swept if k != "seed"], jobs, arms, comparison_columns(jobs))


def _seed_order(seed: str) -> tuple[int, float | str]:
    try:
        return 0, float(seed)
    except ValueError:
        return 1, seed


# ------------------------------------------------------------------------------ writing
def write_sweep_comparison(sweep_dir: str | Path, heatmaps: bool = True) -> Path:
    """``comparison/comparison.md``, ``comparison.csv``, ``jobs.csv`` and ``heatmaps.png``; returns the .md path."""
    from ftrl.analysis.tables import _md_table
    from ftrl.artifacts import atomic_write

    sweep_dir = Path(sweep_dir)
    comparison = sweep_comparison(sweep_dir, heatmaps)
    out = sweep_dir / COMPARISON_DIR
    out.mkdir(parents=True, exist_ok=True)
    png = _write_heatmaps(comparison, out / "heatmaps.png") if heatmaps else None
    arm_header, arm_body = comparison.arm_rows()
    job_header, job_body = comparison.job_rows()
    notes = [f"- {job.path.name}: {note}" for job in comparison.jobs for note in job.notes]
    text = [f"# Comparison of the sweep {sweep_dir}", "",
            ("One row per arm (jobs that differ only in `seed`): mean ± sample standard deviation over its seeds; "
             "(n=k) where only k jobs have the number. Metrics x100 at the RL start (`warmup`, else `base`), the "
             "last round, and the gain between them. Trainable: parameters the job's freeze policy trains (a tied "
             "embedding counted once). Δ²: share of the squared weight change RL start -> last round in the MLPs "
             "of layers 0-2 (the paper's finding) and of the lower half of the layers (our extension)."), "",
            _md_table(arm_header, arm_body) if arm_body else "(no job directories)", "", "## Jobs", "",
            _md_table(job_header, job_body) if job_body else "(none)", ""]
    if png is not None:
        text += ["## Relative change per job, one colour scale", "", f"![heat-maps]({png.name})", ""]
    text += ["## Notes", "", *(notes or ["- none"]), ""]
    with atomic_write(out / "comparison.md") as handle:
        handle.write("\n".join(text))
    _write_arm_csv(comparison, out / "comparison.csv")
    with atomic_write(out / "jobs.csv", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["job", *comparison.keys, "seed", "checkpoint", *(c.name for c in comparison.columns)])
        for job in comparison.jobs:
            values = [c.value(job) for c in comparison.columns]
            writer.writerow([job.path.name, *(v for _, v in job.arm), job.seed, job.status,
                             *("" if v is None else f"{v:.6g}" for v in values)])
    return out / "comparison.md"


def _write_arm_csv(comparison: Comparison, path: Path) -> None:
    from ftrl.artifacts import atomic_write

    with atomic_write(path, newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow([*comparison.keys, "seeds", *(f"{c.name}:{s}" for c in comparison.columns
                                                      for s in ("mean", "std", "n"))])
        for arm, members in comparison.arms.items():
            cells: list[str] = []
            for column in comparison.columns:
                mean, std, count = _stats([v for v in (column.value(job) for job in members) if v is not None])
                cells += ["" if mean is None else f"{mean:.6g}", "" if std is None else f"{std:.6g}", str(count)]
            writer.writerow([*(v for _, v in arm), " ".join(job.seed for job in members), *cells])


def _write_heatmaps(comparison: Comparison, path: Path) -> Path | None:
    from ftrl.analysis.param_delta import relative_change
    from ftrl.analysis.plots import plot_heatmap_panels

    panels = [(job.label, {key: relative_change(delta, base) for key, (delta, base) in job.cells.items()})
              for job in comparison.jobs if job.cells]
    if not panels:
        path.unlink(missing_ok=True)
        return None
    finite = [v for _, cells in panels for v in cells.values() if math.isfinite(v)]
    log.info("sweep comparison: %d heat-maps, relative change up to %.3g", len(panels), max(finite, default=0.0))
    return plot_heatmap_panels(panels, path, title="relative change RL start -> last round")
