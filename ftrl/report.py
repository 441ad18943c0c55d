"""Results tables: the end-of-run table printed by ``python -m ftrl.run``, and per-scenario breakdowns.

    python -m ftrl.report outputs/default/base          # print the table of a finished run
    python -m ftrl.report table2 RUN_DIR_OR_GLOB ... [--out DIR] [--name NAME]   # Table 2 vs the paper
    python -m ftrl.report sweep SWEEP_DIR               # one row per job of a multirun (sweep_table.md)

``table2`` writes table2.md/.csv/.png and companions.md into outputs/reports/<name>/ (or --out) and
prints the table; the rules (row mapping, Avg, arrows, marks, "—" reasons) are in ftrl/analysis/tables.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ftrl.analysis.tables import (
    AVG,
    COLUMNS,
    Table2,
    build_table2,
    cell_text,
    find_runs,
    load_paper_table2,
    sweep_table,
    write_sweep_table,
    write_table2,
)
from ftrl.artifacts import RunDir

SUBCOMMANDS = ("table2", "sweep")

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


def interventions_table(summary: Mapping[str, Any]) -> str:
    """One line per intervention of the ``intervene`` stage: parameters moved, the metric x100, gain kept."""
    head = summary.get("intervene") or {}
    metric = head.get("metric", "?")
    moved = head.get("base_value") != head.get("trained_value")  # else gain kept is undefined (T scores as B)
    rows = [[f"B ({head.get('base')})", "-", "-", _pct(head.get("base_value")), "0.00" if moved else "-"],
            [f"T ({head.get('target')})", "100.0", "100.0", _pct(head.get("trained_value")), "1.00" if moved else "-"]]
    for line in summary["interventions"]:
        ok = str(line.get("status", "")).startswith("ok")
        gain = line.get("gain_kept")
        rows.append([line["intervention"], _pct(line.get("params_share")) if ok else "-",
                     _pct(line.get("delta_share")) if ok else "-",
                     _pct(line.get("value")) if ok else "skipped", "-" if gain is None else f"{gain:.2f}"])
    title = (f"Interventions ({head.get('csv', 'intervene/interventions.csv')}), {metric} x100; gain kept = "
             f"(value - B) / (T - B):")
    return title + "\n" + format_table(["model", "% params", "% sq. change", metric, "gain kept"], rows)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def smoke_note(run_dir: str | Path | None) -> str | None:
    """What a ``+debug=smoke`` run shows and what it does not, when ``run_dir`` was made by one.

    The run directory's ``.hydra/overrides.yaml`` (written by Hydra) names the overrides of the run.
    """
    if not run_dir:
        return None
    overrides = Path(run_dir) / ".hydra" / "overrides.yaml"
    if not overrides.is_file():
        return None
    lines = overrides.read_text(encoding="utf-8").splitlines()
    if not any(re.fullmatch(r"\s*-\s*[+~]*debug=smoke\s*", line) for line in lines):
        return None
    return ("note: +debug=smoke checks the plumbing (every stage runs end to end and writes its files), not\n"
            "  learning: its model is too small and trains too few steps to call tools, so F1 0 everywhere and\n"
            "  the 'no sampled turn made a tool call' warnings are expected. The run that shows learning is the\n"
            "  default job: `python -m ftrl.run` (about 9.5 minutes on 2 cores; Solve-F1 rises from the warm\n"
            "  start to the last round).")


def print_results(summary: Mapping[str, Any]) -> None:
    """Print the results table (and the smoke note), and write the same text to the log files.

    The table goes to stdout as before; the root logger's file handlers (Hydra's ``run.log``) get it
    too, so a run's log has its results. Console handlers are skipped: the table is already printed.
    """
    evals = summary.get("evals") or []
    parts = []
    if evals:
        parts.append("\nOwn test set (ftrl_test), x100:\n" + results_table(evals))
    if summary.get("interventions"):
        parts.append("\n" + interventions_table(summary))
    note = smoke_note(summary.get("run_dir"))
    if note:
        parts.append("\n" + note)
    parts.append(f"\nrun directory: {summary.get('run_dir', '?')}")
    for part in parts:
        print(part)
    _log_to_files("results:" + "\n".join(parts))


def _log_to_files(text: str) -> None:
    """Hand ``text`` to the root logger's file handlers only (the console already has it printed)."""
    logger = logging.getLogger("ftrl.report")
    record = logger.makeRecord(logger.name, logging.INFO, __file__, 0, "%s", (text,), None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and record.levelno >= handler.level:
            handler.handle(record)


def table2_report(runs: Sequence[str | Path], out: str | Path | None = None, name: str = "table2",
                  paper: str | Path | None = None) -> tuple[Table2, dict[str, Path]]:
    """Build Table 2 from ``runs`` (run directories, globs, folders of runs), write it, print it."""
    paths, bad = find_runs(runs)
    table = build_table2(paths, load_paper_table2(paper) if paper else None, unmatched=bad)
    written = write_table2(table, Path(out) if out else Path("outputs") / "reports" / name)
    print(table2_terminal(table))
    print("\n".join(f"wrote {p}" for p in written.values()))
    return table, written


def table2_terminal(table: Table2) -> str:
    """Table 2 for the terminal: ``ours (paper, ours - paper)``, * best and ' second-best of a column."""
    header = ["model", *(label for _, _, label in COLUMNS), "Avg"]
    body = [[row.label, *(cell_text(row, col, markdown=False) for col, _, _ in COLUMNS),
             cell_text(row, AVG, markdown=False)] for row in table.rows]
    text = "Table 2 (x100): ours (paper, ours - paper); * best, ' second-best over our rows\n" + format_table(header, body)
    if table.unmatched:
        text += "\nunmatched (not in the table):\n" + "\n".join(f"  {what}: {why}" for what, why in table.unmatched)
    return text


def sweep_report(sweep_dir: str | Path) -> Path:
    """Write ``sweep_table.md``/``.csv`` and the arm comparison (``comparison/``) into ``sweep_dir``; print
    both tables and their paths."""
    from ftrl.analysis.sweep_report import sweep_comparison, write_sweep_comparison

    header, body = sweep_table(sweep_dir)
    path = write_sweep_table(sweep_dir)
    print(format_table(header, body) if body else f"{sweep_dir}: no job directories")
    print(f"sweep table: {path}")
    comparison_path = write_sweep_comparison(sweep_dir)
    arm_header, arm_body = sweep_comparison(sweep_dir).arm_rows()
    if arm_body:
        print(format_table(arm_header, arm_body))
    print(f"sweep comparison: {comparison_path}")
    return path


def _subcommand(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m ftrl.report", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    t2 = sub.add_parser("table2", help="Table 2 from runs, beside the paper's numbers")
    t2.add_argument("runs", nargs="+", help="run directories, globs, or folders holding runs")
    t2.add_argument("--out", type=Path, default=None, help="output folder (default outputs/reports/<name>/)")
    t2.add_argument("--name", default="table2")
    t2.add_argument("--paper", type=Path, default=None, help="the paper's numbers (default experiments/paper/table2.csv)")
    sw = sub.add_parser("sweep", help="one row per job of a multirun directory")
    sw.add_argument("sweep_dir", type=Path)
    args = parser.parse_args(argv)
    if args.command == "table2":
        table2_report(args.runs, args.out, args.name, args.paper)
    else:
        if not args.sweep_dir.is_dir():
            raise SystemExit(f"ftrl.report: {args.sweep_dir} is not a directory; give a multirun's sweep directory, "
                             f"e.g. outputs/multirun/tiny_algorithm_ablation")
        sweep_report(args.sweep_dir)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        _subcommand(argv)
        return
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    run_dir = RunDir(args.run_dir)
    if not run_dir.summary.is_file():
        what = "is not a run directory" if not run_dir.manifest.is_file() else "has no summary.json yet (no stage finished)"
        raise SystemExit(f"ftrl.report: {args.run_dir} {what}; give a directory that `python -m ftrl.run` wrote, "
                         f"e.g. outputs/default/base")
    summary = json.loads(run_dir.summary.read_text())
    summary.setdefault("run_dir", str(args.run_dir))
    print_results(summary)


if __name__ == "__main__":
    main()
