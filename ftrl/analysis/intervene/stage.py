"""The ``intervene`` stage: which parameters carry the gain, measured by evaluating intervened models.

From a base B (default: the run's RL start, ``warmup`` if there is one, else ``base``) and a trained T
(default: the last round), every ``intervene.interventions`` entry (``revert:<selector>``,
``transplant:<selector>``) and, for each layer i and kind m of ``intervene.scan``, the scan entry
``transplant:layers=i modules=[m]`` is built on disk (``ftrl.analysis.intervene.build``), evaluated on
``eval.benchmarks`` through the pipeline's evaluator, and deleted unless ``intervene.keep``. A selection
that does not fit the model (``layers=0:3`` on a 2-layer model) is a row marked ``skipped`` with the reason.
Results are kept per intervention with the eval settings and the B/T paths they were made with, so the
stage resumes, and runs again only what changed (``rerun=[intervene]`` evaluates everything again).
B and T reuse the run's own ``eval/<checkpoint>/`` results when they were made with the current settings.

Writes ``<run_dir>/intervene/``: ``interventions.csv`` (one row per model: B, T, each intervention;
parameters changed, their share of the model and of the squared B->T change, each benchmark metric and
its gain kept = (metric - B) / (T - B)), ``layer_scan.png`` (the scan over layers), ``summary.json``,
``eval/<intervention>/`` (per-sample records), and ``interventions`` lines in the run's ``summary.json``
(printed under the results table).

    python -m ftrl.run stages=[intervene]                     # on the default run's checkpoints
    python -m ftrl.run stages=[build_envs,intervene] intervene.base=<B dir> intervene.target=<T dir>
"""

from __future__ import annotations

import csv
import logging
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftrl.analysis.intervene.build import CheckpointLayout, build_intervention, check_same_tensors, read_layout
from ftrl.analysis.intervene.selection import num_layers_for, select_names
from ftrl.analysis.param_delta import CheckpointError, compare_checkpoints, resolve_checkpoint
from ftrl.analysis.tables import COLUMNS
from ftrl.artifacts import RunDir, atomic_write, read_json, write_json
from ftrl.config import ConfigError, InterveneConfig, SelectorSpec, parse_intervention
from ftrl.params import expand_module_kinds, format_layers, parse_layer_range

if TYPE_CHECKING:
    from ftrl.run_state import RunContext

log = logging.getLogger(__name__)

INTERVENE_DIR = "intervene"
CSV_NAME = "interventions.csv"
PLOT_NAME = "layer_scan.png"
SUMMARY_NAME = "summary.json"
RECORD_NAME = "intervention.json"
HEADLINE = "ftrl_test/solve_f1"  # the default metric of the plot and the summary lines, when evaluated
BASE_COLUMNS = ("intervention", "kind", "selector", "layers", "modules", "tensors_changed", "params_changed",
                "params_share", "delta_share", "status")

# (run dir with eval_dir = intervene/eval, checkpoint label, model path) -> metrics
Evaluate = Callable[[RunDir, str, Path], dict[str, float]]


class InterventionRunDir(RunDir):
    """The run directory, with evaluation records under ``intervene/eval/`` (benchmarks write to ``eval_dir``)."""

    @property
    def intervene_dir(self) -> Path:
        return self.root / INTERVENE_DIR

    @property
    def eval_dir(self) -> Path:
        return self.intervene_dir / "eval"

    def model_dir(self, slug: str) -> Path:
        return self.intervene_dir / "models" / slug


@dataclass(frozen=True)
class Endpoint:
    """B or T: a checkpoint of this run (``run_checkpoint`` names it) or a path given as ``label``."""

    role: str
    label: str
    path: Path
    run_checkpoint: str | None

    @property
    def slug(self) -> str:
        return f"{self.role}-{_safe(self.label)}"


@dataclass
class Planned:
    """One intervention to build and evaluate, with what it selects in this checkpoint (or why it is skipped)."""

    label: str
    kind: str
    spec: SelectorSpec
    slug: str
    scan: tuple[int, str] | None = None
    chosen: tuple[str, ...] = ()
    skipped: str | None = None


@dataclass
class Row:
    """One line of ``interventions.csv``."""

    label: str
    kind: str
    selector: str
    layers: str
    modules: str
    tensors_changed: int
    params_changed: int
    params_share: float
    delta_share: float
    status: str
    metrics: dict[str, float] = field(default_factory=dict)
    scan: tuple[int, str] | None = None


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("_") or "x"


def _slug(kind: str, selector: str) -> str:
    import hashlib

    safe = _safe(selector)[:48]
    if safe == selector:
        return f"{kind}-{safe}"
    return f"{kind}-{safe}-{hashlib.sha1(selector.encode()).hexdigest()[:6]}"


# ------------------------------------------------------------------------------ B, T and the plan
def resolve_endpoints(ctx: RunContext) -> tuple[Endpoint, Endpoint]:
    """B and T from ``intervene.base/target`` (a checkpoint name of this run, or a path), else the defaults."""
    cfg = ctx.cfg.intervene
    found = dict(ctx.checkpoints())
    rounds = [name for name in found if name.startswith("round")]
    base = cfg.base or ("warmup" if "warmup" in found else "base")
    target = cfg.target or (rounds[-1] if rounds else None)
    if target is None:
        raise CheckpointError(f"intervene needs a trained checkpoint; this run has {list(found)}. Run the train "
                              "stage first, or set intervene.base and intervene.target")
    b, t = _endpoint("B", base, found, "intervene.base"), _endpoint("T", target, found, "intervene.target")
    if b.path.resolve() == t.path.resolve():
        raise ConfigError(f"intervene.base and intervene.target are one checkpoint ({b.path}); nothing to compare")
    return b, t


def _endpoint(role: str, value: str, found: Mapping[str, Path | str], key: str) -> Endpoint:
    if value in found:
        return Endpoint(role, value, resolve_checkpoint(found[value]), value)
    try:
        return Endpoint(role, value, resolve_checkpoint(value), None)
    except CheckpointError as error:
        raise CheckpointError(f"{key}: '{value}' is neither a checkpoint of this run ({', '.join(found)}) nor a "
                              f"checkpoint path: {error}") from None


def plan_interventions(cfg: InterveneConfig, names: Sequence[str], num_layers: int) -> list[Planned]:
    """The listed interventions, then the per-layer scan; each resolved against ``names`` (or marked skipped)."""
    items: list[Planned] = []
    for index, text in enumerate(cfg.interventions):
        kind, spec = parse_intervention(text, f"intervene.interventions[{index}]")
        items.append(Planned(f"{kind}:{spec.text}", kind, spec, _slug(kind, spec.text)))
    scan_layers = (parse_layer_range(cfg.scan_layers, num_layers, "intervene.scan_layers")
                   if cfg.scan_layers is not None else set(range(num_layers)))
    for layer in sorted(scan_layers):
        for module in cfg.scan:
            spec = SelectorSpec(f"layers={layer} modules=[{module}]", str(layer), (module,))
            items.append(Planned(f"transplant:{spec.text}", "transplant", spec,
                                 f"transplant-L{layer:02d}-{_safe(module)}", scan=(layer, module)))
    unique: dict[str, Planned] = {}
    for item in items:
        unique.setdefault(item.slug, item)
    for item in unique.values():
        try:
            item.chosen = tuple(select_names(item.spec, names, num_layers, item.spec.text))
        except ConfigError as error:
            item.skipped = f"skipped: {error}"
            continue
        if not item.chosen:
            item.skipped = "skipped: selects no tensor of this checkpoint"
    return list(unique.values())


# ------------------------------------------------------------------------------ evaluation
def _evaluate_cached(rd: InterventionRunDir, slug: str, record: dict[str, Any], policy: Callable[[], Path],
                     evaluate: Evaluate, rerun: bool) -> dict[str, float]:
    """Metrics of ``intervene/eval/<slug>/``, made now unless made before under the same ``record``."""
    folder = rd.eval_dir / slug
    metrics_path, record_path = folder / "metrics.json", folder / RECORD_NAME
    same = record_path.is_file() and read_json(record_path) == record
    if same and metrics_path.is_file() and not rerun:
        return read_json(metrics_path)
    if folder.exists() and (rerun or not same):
        shutil.rmtree(folder)  # results of other settings, B or T: a partial evaluation must not resume from them
    write_json(record_path, record)
    metrics = evaluate(rd, slug, policy())
    write_json(metrics_path, metrics)
    return metrics


def reference_metrics(ctx: RunContext, rd: InterventionRunDir, end: Endpoint, settings: Mapping[str, Any],
                      evaluate: Evaluate, rerun: bool) -> tuple[dict[str, float], str]:
    """B's or T's metrics: the run's ``eval/<checkpoint>/`` when made with ``settings``, else evaluated now."""
    run, name = ctx.run_dir, end.run_checkpoint
    if (name is not None and not rerun and run.is_done(f"eval_{name}") and run.eval_metrics(name).is_file()
            and run.eval_settings(name).is_file() and read_json(run.eval_settings(name)) == dict(settings)):
        return read_json(run.eval_metrics(name)), f"eval/{name}"
    record = {"intervention": end.role, "checkpoint": str(end.path), "eval_settings": dict(settings)}
    return (_evaluate_cached(rd, end.slug, record, lambda: end.path, evaluate, rerun),
            f"{INTERVENE_DIR}/eval/{end.slug}")


def _evaluate_intervention(item: Planned, ends: tuple[Endpoint, Endpoint], layouts: tuple[CheckpointLayout, ...],
                           rd: InterventionRunDir, record: dict[str, Any], evaluate: Evaluate,
                           release: Callable[[], None], keep: bool, rerun: bool) -> dict[str, float]:
    model_dir = rd.model_dir(item.slug)

    def policy() -> Path:
        marker = model_dir / RECORD_NAME
        if not (marker.is_file() and read_json(marker) == record):
            build_intervention(layouts[0], layouts[1], item.kind, item.spec, model_dir)
            write_json(marker, record)
        return model_dir

    try:
        return _evaluate_cached(rd, item.slug, record, policy, evaluate, rerun)
    finally:
        release()  # the engine may map the model's files; free it before they go
        if not keep:
            shutil.rmtree(model_dir, ignore_errors=True)
            if model_dir.parent.is_dir() and not any(model_dir.parent.iterdir()):
                model_dir.parent.rmdir()


# ------------------------------------------------------------------------------ numbers
def gain_kept(value: float | None, base: float | None, trained: float | None) -> float | None:
    """``(value - base) / (trained - base)``: 0 = B's score, 1 = T's; None where T scores as B does."""
    if value is None or base is None or trained is None or abs(trained - base) < 1e-12:
        return None
    return (value - base) / (trained - base)


def metric_keys(metrics: Mapping[str, float]) -> list[str]:
    """Benchmark-level keys (``ftrl_test/solve_f1``; not per group, not counts): Solve-F1, then Table 2's
    other columns, then the rest alphabetically."""
    keys = [k for k in metrics if k.count("/") == 1 and not k.endswith(("/n", "/failed"))]
    first = [key for key in dict.fromkeys([HEADLINE, *(key for _, key, _ in COLUMNS)]) if key in keys]
    return first + sorted(k for k in keys if k not in first)


def headline_metric(cfg: InterveneConfig, metrics: Mapping[str, float]) -> str:
    keys = metric_keys(metrics)
    if cfg.metric is not None:
        if cfg.metric not in metrics:
            raise ConfigError(f"intervene.metric: '{cfg.metric}' is not a metric of the evaluation; valid: {keys}")
        return cfg.metric
    if not keys:
        raise ConfigError(f"intervene.metric: the evaluation gave no benchmark-level metric ({sorted(metrics)})")
    return keys[0]


def _delta_shares(b: Endpoint, t: Endpoint) -> dict[str, float]:
    """Each tensor's share of the squared B->T change (streamed, ``ftrl.analysis.param_delta``)."""
    rows = compare_checkpoints(b.path, t.path).rows
    total = sum(row.delta_sq for row in rows)
    return {row.name: (row.delta_sq / total if total > 0 else 0.0) for row in rows}


def _row(item: Planned, numels: Mapping[str, int], shares: Mapping[str, float], num_layers: int,
         metrics: dict[str, float] | None) -> Row:
    total = sum(numels.values())
    changed = sum(numels[name] for name in item.chosen)
    layers = (format_layers(parse_layer_range(item.spec.layers, num_layers, item.label))
              if item.spec.layers is not None and not item.skipped else (item.spec.layers or "all"))
    modules = ",".join(expand_module_kinds(item.spec.modules, item.label)) or "all"
    return Row(item.label, item.kind, item.spec.text, layers, modules, len(item.chosen), changed,
               changed / total if total else 0.0, sum(shares.get(name, 0.0) for name in item.chosen),
               item.skipped or "ok", dict(metrics or {}), item.scan)


# ------------------------------------------------------------------------------ the stage
def run_interventions(ctx: RunContext, evaluate: Evaluate, release: Callable[[], None],
                      settings: Mapping[str, Any]) -> dict[str, Any]:
    """Build and evaluate every planned intervention of ``ctx.cfg.intervene``; write ``intervene/``.

    ``evaluate(run_dir, label, model_dir)`` runs ``eval.benchmarks`` on a model (records under
    ``run_dir.eval_dir``); ``release()`` frees the engine; ``settings`` are the eval settings results carry.
    """
    cfg, rerun = ctx.cfg.intervene, "intervene" in ctx.cfg.rerun
    rd = InterventionRunDir(ctx.run_dir.root)
    b, t = resolve_endpoints(ctx)
    layouts = (read_layout(b.path), read_layout(t.path))
    check_same_tensors(*layouts)
    names, numels = layouts[1].names(), layouts[1].numels()
    num_layers = num_layers_for(t.path, names)
    plan = plan_interventions(cfg, names, num_layers)
    log.info("intervene: B=%s (%s) T=%s (%s), %d layers, %d interventions (%d skipped)", b.label, b.path, t.label,
             t.path, num_layers, len(plan), sum(item.skipped is not None for item in plan))
    shares = _delta_shares(b, t)
    b_metrics, b_source = reference_metrics(ctx, rd, b, settings, evaluate, rerun)
    release()
    t_metrics, t_source = reference_metrics(ctx, rd, t, settings, evaluate, rerun)
    release()
    metric = headline_metric(cfg, t_metrics)
    total = sum(numels.values())
    rows = [Row(f"B ({b.label})", "base", "", "", "", 0, 0, 0.0, 0.0, f"ok ({b_source})", b_metrics),
            Row(f"T ({t.label})", "trained", "all", "all", "all", len(names), total, 1.0, 1.0, f"ok ({t_source})",
                t_metrics)]
    for number, item in enumerate(plan, start=1):
        metrics = None
        if item.skipped is None:
            record = {"intervention": item.label, "base": str(b.path), "target": str(t.path),
                      "eval_settings": dict(settings)}
            metrics = _evaluate_intervention(item, (b, t), layouts, rd, record, evaluate, release, cfg.keep, rerun)
        rows.append(_row(item, numels, shares, num_layers, metrics))
        _log_row(number, len(plan), rows[-1], metric, b_metrics, t_metrics)
    return write_outputs(ctx, rd, rows, metric, (b, t))


def _log_row(number: int, count: int, row: Row, metric: str, b: Mapping[str, float], t: Mapping[str, float]) -> None:
    if not row.metrics:
        log.warning("intervene %d/%d: %s %s", number, count, row.label, row.status)
        return
    gain = gain_kept(row.metrics.get(metric), b.get(metric), t.get(metric))
    log.info("intervene %d/%d: %s (%.1f%% of the parameters, %.1f%% of the squared change) -> %s %.4g, gain kept %s",
             number, count, row.label, 100 * row.params_share, 100 * row.delta_share, metric,
             row.metrics.get(metric, float("nan")), "-" if gain is None else f"{gain:.3f}")


def write_outputs(ctx: RunContext, rd: InterventionRunDir, rows: Sequence[Row], metric: str,
                  ends: tuple[Endpoint, Endpoint]) -> dict[str, Any]:
    """``interventions.csv``, ``layer_scan.png``, ``intervene/summary.json`` and the run summary's lines."""
    from ftrl.analysis.plots import plot_layer_scan

    b_metrics, t_metrics = rows[0].metrics, rows[1].metrics
    csv_path = write_interventions_csv(rows, rd.intervene_dir / CSV_NAME)
    scan = [row for row in rows if row.scan is not None and row.metrics]
    plot_path = None
    if scan:
        plot_path = plot_layer_scan(
            [(row.scan[0], row.scan[1], row.metrics.get(metric), row.delta_share) for row in scan if row.scan],
            rd.intervene_dir / PLOT_NAME, metric=metric, base=b_metrics.get(metric), trained=t_metrics.get(metric),
            title=f"per-layer transplant scan: B={ends[0].label} with layer i's kind from T={ends[1].label}")
    lines = [{"intervention": row.label, "params_changed": row.params_changed, "params_share": row.params_share,
              "delta_share": row.delta_share, "value": row.metrics.get(metric),
              "gain_kept": gain_kept(row.metrics.get(metric), b_metrics.get(metric), t_metrics.get(metric)),
              "status": row.status} for row in rows[2:]]
    header = {"base": ends[0].label, "target": ends[1].label, "base_path": str(ends[0].path),
              "target_path": str(ends[1].path), "metric": metric, "base_value": b_metrics.get(metric),
              "trained_value": t_metrics.get(metric), "csv": str(csv_path),
              "plot": str(plot_path) if plot_path else None}
    write_json(rd.intervene_dir / SUMMARY_NAME, {**header, "interventions": lines})
    summary = read_json(ctx.run_dir.summary) if ctx.run_dir.summary.exists() else {}
    summary.update({"intervene": header, "interventions": lines})
    write_json(ctx.run_dir.summary, summary)
    log.info("intervene: wrote %s%s", csv_path, f" and {plot_path}" if plot_path else "")
    return {"base": ends[0].label, "target": ends[1].label, "metric": metric, "interventions": len(lines),
            "skipped": sum(not line["status"].startswith("ok") for line in lines), "csv": str(csv_path)}


def write_interventions_csv(rows: Sequence[Row], path: Path) -> Path:
    """One line per model; per benchmark metric its value and its gain kept (empty where undefined)."""
    b_metrics, t_metrics = rows[0].metrics, rows[1].metrics
    keys = metric_keys(t_metrics)
    header = [*BASE_COLUMNS, *(f"{key}" for key in keys), *(f"gain_kept:{key}" for key in keys)]
    with atomic_write(path, newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        for row in rows:
            values = [row.metrics.get(key) for key in keys]
            gains = [gain_kept(row.metrics.get(key), b_metrics.get(key), t_metrics.get(key)) for key in keys]
            writer.writerow([row.label, row.kind, row.selector, row.layers, row.modules, row.tensors_changed,
                             row.params_changed, f"{row.params_share:.6f}", f"{row.delta_share:.6f}", row.status,
                             *("" if v is None else f"{v:.6g}" for v in values),
                             *("" if g is None else f"{g:.4f}" for g in gains)])
    return path
