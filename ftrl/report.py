"""Results tables: the end-of-run table printed by ``python -m ftrl.run``, and per-scenario breakdowns.

    python -m ftrl.report outputs/default/base          # print the table of a finished run
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ftrl.artifacts import RunDir

HEADLINE = (("ftrl_test/solve_p", "Solve-P"), ("ftrl_test/solve_r", "Solve-R"), ("ftrl_test/solve_f1", "Solve-F1"))


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w)
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def results_table(evals: Sequence[Mapping[str, Any]]) -> str:
    """One row per checkpoint: headline metrics (x100) and Solve-F1 per scenario."""
    scenarios: list[str] = []
    for entry in evals:
        for key in entry["metrics"]:
            parts = key.split("/")
            if len(parts) == 3 and parts[0] == "ftrl_test" and parts[2] == "solve_f1" and parts[1] not in scenarios:
                scenarios.append(parts[1])
    header = ["checkpoint", *(label for _, label in HEADLINE), *(f"F1 {s}" for s in scenarios)]
    rows = []
    for entry in evals:
        metrics = entry["metrics"]
        cells = [entry["checkpoint"]]
        cells += [_pct(metrics.get(key)) for key, _ in HEADLINE]
        cells += [_pct(metrics.get(f"ftrl_test/{s}/solve_f1")) for s in scenarios]
        rows.append(cells)
    return format_table(header, rows)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def print_results(summary: Mapping[str, Any]) -> None:
    evals = summary.get("evals") or []
    if evals:
        print("\nOwn test set (ftrl_test), x100:")
        print(results_table(evals))
    print(f"\nrun directory: {summary.get('run_dir', '?')}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    summary = json.loads(RunDir(args.run_dir).summary.read_text())
    summary.setdefault("run_dir", str(args.run_dir))
    print_results(summary)


if __name__ == "__main__":
    main()
