"""Benchmark results: one :class:`Measure` per comparison, printed as a table and written to ``bench.json``.

``bench.json`` maps a name (the stage for its headline number, ``stage.detail`` for the others) to
``{"ours", "baseline", "ratio", "unit", "higher_is_better", "limit", "stage", "what", "baseline_name",
"checks", "details"}``; ``ratio`` is ``ours / baseline``; ``limit`` is the best any implementation
could reach on this machine where one exists (else null); ``checks`` are booleans that must hold
(equal outputs, no memory growth). ``machine.json`` beside it says where the numbers were taken.

    python -m ftrl.bench --quick --out /tmp/bench
"""

from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftrl.artifacts import atomic_write_text

BENCH_JSON = "bench.json"
MACHINE_JSON = "machine.json"
REQUIRED_KEYS: tuple[str, ...] = ("ours", "baseline", "ratio", "unit", "higher_is_better")


@dataclass
class Measure:
    """One comparison: our number, the baseline's, on the same work in the same process."""

    name: str
    stage: str
    what: str
    unit: str
    ours: float
    baseline: float
    baseline_name: str
    higher_is_better: bool = True
    limit: float | None = None
    checks: dict[str, bool] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.ours / self.baseline if self.baseline else float("inf")

    def record(self) -> dict[str, Any]:
        return {"ours": self.ours, "baseline": self.baseline, "ratio": self.ratio, "unit": self.unit,
                "higher_is_better": self.higher_is_better, "limit": self.limit, "stage": self.stage,
                "what": self.what, "baseline_name": self.baseline_name, "checks": dict(self.checks),
                "details": dict(self.details)}


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}" if value < 10 else f"{value:.1f}"


def format_table(measures: Sequence[Measure]) -> str:
    """The printed table: one line per measure (ours, baseline, ratio, limit, checks)."""
    header = ("measure", "unit", "ours", "baseline", "ratio", "limit", "checks", "baseline is")
    rows = [header]
    for m in measures:
        better = "" if m.higher_is_better else " (lower is better)"
        checks = ", ".join(f"{k}={'ok' if v else 'FAILED'}" for k, v in m.checks.items()) or "-"
        rows.append((m.name, m.unit + better, _number(m.ours), _number(m.baseline), f"{m.ratio:.2f}x",
                     _number(m.limit), checks, m.baseline_name))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    """CPU, threads, load and library versions: what the numbers depend on."""
    import torch
    import transformers

    info: dict[str, Any] = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                            "platform": platform.platform(), "python": sys.version.split()[0],
                            "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - platforms without getloadavg
        pass
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        info["cpu_model"] = names[0] if names else None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_results(out_dir: Path, measures: Sequence[Measure], machine: Mapping[str, Any]) -> Path:
    """Write ``bench.json`` (merged with an earlier file's other stages) and ``machine.json``; return bench.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / BENCH_JSON
    records: dict[str, Any] = {}
    if path.is_file():
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            records = {}
    stages = {m.stage for m in measures}
    records = {k: v for k, v in records.items() if v.get("stage") not in stages}
    records.update({m.name: m.record() for m in measures})
    atomic_write_text(path, json.dumps(records, indent=2, sort_keys=True) + "\n")
    atomic_write_text(out_dir / MACHINE_JSON, json.dumps(dict(machine), indent=2) + "\n")
    return path


def check_schema(records: Mapping[str, Any]) -> list[str]:
    """Problems with a ``bench.json`` (empty when it follows the schema)."""
    problems = []
    for name, record in records.items():
        missing = [key for key in REQUIRED_KEYS if key not in record]
        if missing:
            problems.append(f"{name}: missing {missing}")
            continue
        if record["baseline"] and abs(record["ratio"] - record["ours"] / record["baseline"]) > 1e-9 * abs(record["ratio"]):
            problems.append(f"{name}: ratio {record['ratio']} != ours / baseline")
        if not isinstance(record["higher_is_better"], bool):
            problems.append(f"{name}: higher_is_better must be a bool")
        failed = [key for key, ok in (record.get("checks") or {}).items() if not ok]
        if failed:
            problems.append(f"{name}: checks failed: {failed}")
    return problems
