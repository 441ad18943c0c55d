"""Paper tables from run directories: Table 2 beside the paper's numbers, its companion tables, sweep tables.

Reads only what runs wrote (``summary.json``, ``.hydra/config.yaml``) and the paper's numbers
(``experiments/paper/table2.csv``); trains and evaluates nothing. Scores are stored in [0, 1] and shown
x100 with two decimals, as the paper prints them.

* **Row mapping.** A run's config names its row: ``model.name`` (``api``: the served id ``model.path``,
  matched against the ids in the CSV's ``model`` column), ``mode.name``, and per checkpoint the
  variant: ``base`` -> the model's base row (Instruct / Non-Reasoning / Reasoning), the last round ->
  the ``algorithm.name`` row (FTRL-GRPO, FTRL-Reinforce++). The tiny model gets rows of its own
  (every checkpoint; not in the paper). Anything else (an ablation's ``freeze``, another reward, PPO,
  a model or API id the paper does not list, a folder that is not a run) is listed as *unmatched*
  with the reason, never dropped silently.
* **Cells.** ours (x100), then the paper's value and ours minus the paper's. "—" with the reason
  where there is no number: the benchmark was not in ``eval.benchmarks``, the run is unfinished, no
  run maps to the row. Avg is the mean of the eight columns, only when all eight are there.
* **Marks.** ↑/↓: a trained row against the row its training started from (the same model and
  mode's base row; the tiny model's warm start). Best **bold** and second-best <u>underlined</u> per
  column over our rows, as the paper marks its own.
* **Names.** The metric keys are the ones W&B gets (``ftrl.tracking``): a job's W&B summary holds
  ``eval/<checkpoint>/<key>`` for every checkpoint and ``<key>`` for the last one, so a W&B table of
  the experiment group shows the numbers of ``table2.md`` (x100 here).

    python -m ftrl.report table2 outputs/qwen3_8b_grpo/base 'outputs/eval_*/*'   # -> outputs/reports/table2/
    python -m ftrl.report sweep outputs/multirun/tiny_algorithm_ablation
"""

from __future__ import annotations

import csv
import glob
import io
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ftrl.artifacts import atomic_path, atomic_write

PAPER_TABLE2 = Path(__file__).resolve().parents[2] / "experiments" / "paper" / "table2.csv"
MISSING = "—"

# Table 2's eight columns: (CSV column, metric key in summary.json / W&B, header).
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("solve_p", "ftrl_test/solve_p", "Solve-P"),
    ("solve_r", "ftrl_test/solve_r", "Solve-R"),
    ("solve_f1", "ftrl_test/solve_f1", "Solve-F1"),
    ("toolhop_ac", "toolhop/ac", "ToolHop AC"),
    ("taubench_pass_1", "taubench/pass_1", "τ-bench Pass^1"),
    ("rotbench_ts", "rotbench/ts", "RoTBench TS"),
    ("rotbench_pi", "rotbench/pi", "RoTBench PI"),
    ("rotbench_cf", "rotbench/cf", "RoTBench CF"),
)
AVG = "avg"
SECTION_TITLES = {"closed": "Closed-source LLMs", "open_large": "Open-source LLMs (32B - 72B)",
                  "open_small": "Open-source LLMs (7B - 14B)", "tiny": "This project's tiny model (CPU; not in the paper)"}
TRAINED_VARIANTS = {"grpo": "FTRL-GRPO", "reinforce_pp": "FTRL-Reinforce++"}
VARIANT_ORDER = ("base", "reinforce_pp", "grpo")


def _benchmark(key: str) -> str:
    return key.split("/", 1)[0]


# ------------------------------------------------------------------------------------ the paper
@dataclass
class PaperRow:
    row: str
    section: str
    label: str
    model: str                      # our model group name, or "api:<id>|<id>..."
    mode: str
    variant: str                    # base | grpo | reinforce_pp
    values: dict[str, float | None]  # CSV column -> x100 value; None: the cell is empty
    avg: float | None
    experiment: str

    def api_ids(self) -> list[str]:
        return [_norm_api_id(i) for i in self.model[4:].split("|")] if self.model.startswith("api:") else []


def _num(text: str | None) -> float | None:
    text = (text or "").strip()
    return None if text in ("", MISSING, "-") else float(text)


def load_paper_table2(path: str | Path = PAPER_TABLE2) -> list[PaperRow]:
    """The paper's Table 2 rows (experiments/paper/table2.csv); empty cells read as None."""
    rows = []
    with open(path, encoding="utf-8", newline="") as handle:
        for rec in csv.DictReader(handle):
            label = f"{rec['family']} {rec['version']}".strip()
            rows.append(PaperRow(rec["row"], rec["section"], label, rec["model"], rec["mode"], rec["variant"],
                                 {col: _num(rec.get(col)) for col, _, _ in COLUMNS}, _num(rec.get(AVG)),
                                 rec["experiment"]))
    return rows


def mean_of_columns(values: Mapping[str, float | None]) -> float | None:
    """Table 2's Avg: the mean of the eight columns, or None when one of them is missing."""
    cells = [values.get(col) for col, _, _ in COLUMNS]
    return None if any(v is None for v in cells) else sum(cells) / len(cells)  # type: ignore[arg-type]


def _norm_api_id(text: str) -> str:
    """``openai/gpt-4o-2024-08-06`` -> ``gpt-4o``: provider prefix and date suffix dropped, lower case."""
    text = text.strip().lower().rsplit("/", 1)[-1]
    return re.sub(r"-(\d{8}|\d{4}-\d{2}-\d{2})$", "", text)


# ------------------------------------------------------------------------------------ runs
@dataclass
class Run:
    path: Path
    config: dict[str, Any]
    summary: dict[str, Any] | None

    @property
    def label(self) -> str:
        leaf = self.path.name
        name = str(self.config.get("name") or self.path.parent.name)
        return name if leaf == "base" else f"{name}/{leaf}"

    def cfg(self, dotted: str, default: Any = None) -> Any:
        node: Any = self.config
        for part in dotted.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return default
            node = node[part]
        return node

    @property
    def evals(self) -> dict[str, dict[str, float]]:
        return {e["checkpoint"]: e["metrics"] for e in (self.summary or {}).get("evals", [])}

    @property
    def benchmarks(self) -> list[str]:
        settings = (self.summary or {}).get("eval_settings") or {}
        return list(settings.get("benchmarks") or self.cfg("eval.benchmarks") or [])


def _is_run_dir(path: Path) -> bool:
    return any((path / name).is_file() for name in (".hydra/config.yaml", "summary.json", "manifest.json"))


def find_runs(args: Sequence[str | Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Run directories named by ``args`` (a run directory, a glob, or a folder holding runs, searched
    three levels deep), and ``(arg, reason)`` for each argument that names none."""
    found: list[Path] = []
    bad: list[tuple[str, str]] = []
    for arg in args:
        matches = [Path(p) for p in sorted(glob.glob(str(arg)))] or [Path(arg)]
        runs: list[Path] = []
        for path in matches:
            if _is_run_dir(path):
                runs.append(path)
            elif path.is_dir():
                runs += sorted(p.parent.parent if p.name == "config.yaml" else p.parent
                               for pattern in ("*/.hydra/config.yaml", "*/*/.hydra/config.yaml",
                                               "*/*/*/.hydra/config.yaml")
                               for p in path.glob(pattern))
        if not runs:
            bad.append((str(arg), "no such path" if not matches[0].exists() else
                        "not a run directory (no .hydra/config.yaml, summary.json or manifest.json) and holds none"))
        found += [r for r in runs if r not in found]
    return found, bad


def load_run(path: str | Path) -> Run:
    path = Path(path)
    config_file = path / ".hydra" / "config.yaml"
    config = yaml.safe_load(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    summary_file = path / "summary.json"
    summary = json.loads(summary_file.read_text(encoding="utf-8")) if summary_file.is_file() else None
    return Run(path, config or {}, summary)


# ------------------------------------------------------------------------------------ the table
@dataclass
class Cell:
    ours: float | None = None        # x100
    reason: str = ""                 # why ours is missing
    arrow: str = ""
    mark: str = ""                   # "best" | "second" | ""


@dataclass
class TableRow:
    key: str                         # paper row id, or tiny:<run>:<checkpoint>
    section: str
    label: str
    paper: PaperRow | None
    reference: str | None            # key of the row the arrows compare with
    cells: dict[str, Cell] = field(default_factory=dict)   # column (and "avg") -> cell
    source: str = ""                 # run directory and checkpoint that filled it
    metrics: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def filled(self) -> bool:
        return bool(self.source)


@dataclass
class Table2:
    rows: list[TableRow]
    unmatched: list[tuple[str, str]]    # (run or argument, reason)

    def row(self, key: str) -> TableRow:
        return next(r for r in self.rows if r.key == key)


def _fill(row: TableRow, run: Run, checkpoint: str) -> None:
    metrics = run.evals.get(checkpoint)
    row.source = f"{run.path} [{checkpoint}]"
    row.metrics = dict(metrics or {})
    benchmarks = run.benchmarks
    for col, key, _ in COLUMNS:
        cell = row.cells[col]
        if metrics is not None and key in metrics:
            cell.ours, cell.reason = 100 * float(metrics[key]), ""
        elif _benchmark(key) not in benchmarks:
            cell.reason = f"{_benchmark(key)} not run (eval.benchmarks={benchmarks})"
        else:
            cell.reason = f"no {key} in the run's metrics"


def _empty_row(key: str, section: str, label: str, paper: PaperRow | None, reference: str | None,
               reason: str) -> TableRow:
    row = TableRow(key, section, label, paper, reference)
    row.cells = {col: Cell(reason=reason) for col, _, _ in COLUMNS}
    row.cells[AVG] = Cell()
    return row


def _last_round(run: Run) -> str | None:
    rounds = sorted((int(m.group(1)), name) for name in run.evals if (m := re.fullmatch(r"round(\d+)", name)))
    return rounds[-1][1] if rounds else None


def build_table2(run_paths: Sequence[str | Path], paper: Sequence[PaperRow] | None = None,
                 unmatched: Sequence[tuple[str, str]] = ()) -> Table2:
    """Map every run to its rows and fill them; see the module docstring for the rules."""
    paper = list(load_paper_table2() if paper is None else paper)
    base_of = {(p.model, p.mode): p.row for p in paper if p.variant == "base"}
    rows = [_empty_row(p.row, p.section, p.label, p, None if p.variant == "base" else base_of.get((p.model, p.mode)),
                       f"not run: python -m ftrl.run +experiment={p.experiment}") for p in paper]
    by_key = {r.key: r for r in rows}
    lost = list(unmatched)
    for path in run_paths:
        _place_run(path, load_run(path), paper, base_of, rows, by_key, lost)
    rows = _ordered(rows)
    _finish(rows)
    return Table2(rows, lost)


def _claim(by_key: dict[str, TableRow], lost: list[tuple[str, str]], key: str, run: Run, checkpoint: str) -> None:
    """Fill row ``key`` from ``run``'s ``checkpoint`` unless another run already filled it."""
    row = by_key[key]
    if row.filled:
        lost.append((f"{run.path} [{checkpoint}]", f"row {row.label!r} is already filled by {row.source}"))
        return
    _fill(row, run, checkpoint)


def _mark_unfilled(row: TableRow, reason: str) -> None:
    """Give every cell of a still-empty row ``reason``."""
    if not row.filled:
        row.cells.update({c: Cell(reason=reason) for c, _, _ in COLUMNS})


def _api_model(run: Run, paper: Sequence[PaperRow], mode: Any, path: str | Path,
               lost: list[tuple[str, str]]) -> str | None:
    """The Table 2 model an API run evaluates, or None (noted in ``lost``) when it is no row."""
    ident = _norm_api_id(str(run.cfg("model.path") or ""))
    candidates = [p for p in paper if ident in p.api_ids() and p.mode == mode]
    if not candidates:
        lost.append((str(path), f"API model {run.cfg('model.path')!r} ({mode}) is not a Table 2 row"))
        return None
    return candidates[0].model


def _place_run(path: str | Path, run: Run, paper: Sequence[PaperRow], base_of: dict[tuple[str, str], str],
               rows: list[TableRow], by_key: dict[str, TableRow], lost: list[tuple[str, str]]) -> None:
    """Fill the rows one run belongs to, or say in ``lost`` why it fills none."""
    model, mode = run.cfg("model.name"), run.cfg("mode.name")
    if not run.config:
        lost.append((str(path), ("no .hydra/config.yaml (a dry run, or refused before it started): "
                                "cannot tell which row it is")))
        return
    if model == "tiny":
        _add_tiny_rows(rows, by_key, run, lost)
        return
    if model == "api":
        model = _api_model(run, paper, mode, path, lost)
        if model is None:
            return
    base_row = base_of.get((model, mode))
    if base_row is None:
        lost.append((str(path), f"no Table 2 row for model {model} in mode {mode}"))
        return
    if run.summary is None:
        reason = "run unfinished: no summary.json yet"
        targets = [base_row]
        if "train" in (run.cfg("stages") or []):
            targets += [p.row for p in paper if p.model == model and p.mode == mode
                        and p.variant == run.cfg("algorithm.name")]
        for key in targets:
            _mark_unfilled(by_key[key], reason)
        lost.append((str(path), reason))
        return
    evals = run.evals
    if "base" in evals:
        _claim(by_key, lost, base_row, run, "base")
    stages = run.cfg("stages") or []
    if "train" in stages or any(n.startswith("round") for n in evals):
        _place_trained(path, run, paper, model, mode, by_key, lost)


def _training_problems(run: Run, algorithm: Any) -> list[str]:
    """Why a trained run's checkpoints belong to no Table 2 row (empty when they do)."""
    problems = []
    if algorithm not in TRAINED_VARIANTS:
        problems.append(f"algorithm={algorithm} has no Table 2 row")
    if run.cfg("freeze.name", "none") != "none":
        problems.append(f"freeze={run.cfg('freeze.name')} is an ablation, not a Table 2 row")
    if run.cfg("reward.name", "solve_f1") != "solve_f1":
        problems.append(f"reward={run.cfg('reward.name')} is not the paper's reward")
    return problems


def _place_trained(path: str | Path, run: Run, paper: Sequence[PaperRow], model: str, mode: Any,
                   by_key: dict[str, TableRow], lost: list[tuple[str, str]]) -> None:
    """Fill the trained-variant row from a run's last round, or say in ``lost`` why not."""
    algorithm = run.cfg("algorithm.name")
    problems = _training_problems(run, algorithm)
    if problems:
        lost.append((f"{path} [trained checkpoints]", "; ".join(problems)))
        return
    key = next((p.row for p in paper if p.model == model and p.mode == mode and p.variant == algorithm), None)
    if key is None:
        lost.append((str(path), f"no {TRAINED_VARIANTS[algorithm]} row for {model} ({mode})"))
        return
    last, wanted = _last_round(run), run.cfg("train.rounds")
    if last is None or (isinstance(wanted, int) and last != f"round{wanted}"):
        reason = f"run unfinished: {last or 'no round'} evaluated of {wanted} rounds"
        _mark_unfilled(by_key[key], reason)
        lost.append((f"{path} [trained checkpoints]", reason))
        return
    _claim(by_key, lost, key, run, last)


def _add_tiny_rows(rows: list[TableRow], by_key: dict[str, TableRow], run: Run, lost: list[tuple[str, str]]) -> None:
    if run.summary is None or not run.evals:
        lost.append((str(run.path), "tiny-model run unfinished: no summary.json / no evaluated checkpoint yet"))
        return
    names = list(run.evals)
    start = "warmup" if "warmup" in names else "base"
    for checkpoint in names:
        key = f"tiny:{run.path}:{checkpoint}"
        reference = None if checkpoint in ("base", "warmup") else f"tiny:{run.path}:{start}"
        label = f"tiny {run.cfg('name') or run.label} · {checkpoint}"
        if any(r.label == label for r in rows):  # two runs of one name: the run directory tells them apart
            label = f"tiny {run.label} · {checkpoint}"
        row = _empty_row(key, "tiny", label, None, reference, "")
        _fill(row, run, checkpoint)
        rows.append(row)
        by_key[key] = row


def _ordered(rows: list[TableRow]) -> list[TableRow]:
    order = {s: i for i, s in enumerate(SECTION_TITLES)}
    return sorted(rows, key=lambda r: order.get(r.section, len(order)))  # stable: CSV order within a section


def _finish(rows: list[TableRow]) -> None:
    """Avg, arrows and best/second-best marks, once every row is filled."""
    by_key = {r.key: r for r in rows}
    for row in rows:
        values = {col: row.cells[col].ours for col, _, _ in COLUMNS}
        avg = mean_of_columns(values)
        missing = sum(v is None for v in values.values())
        row.cells[AVG] = Cell(avg, "" if avg is not None or not row.filled else
                              f"needs all eight columns ({missing} missing)")
        if not row.filled:
            row.cells[AVG].reason = next(iter({c.reason for c in row.cells.values() if c.reason}), "")
    for row in rows:
        ref = by_key.get(row.reference) if row.reference else None
        if ref is None:
            continue
        for col, cell in row.cells.items():
            base = ref.cells[col].ours
            if cell.ours is not None and base is not None and round(cell.ours, 2) != round(base, 2):
                cell.arrow = "↑" if cell.ours > base else "↓"
    for col in [c for c, _, _ in COLUMNS] + [AVG]:
        numbered = [r for r in rows if r.cells[col].ours is not None]
        if len(numbered) < 2:  # one number is no ranking
            continue
        distinct = sorted({round(r.cells[col].ours, 2) for r in numbered}, reverse=True)
        for row in rows:
            value = row.cells[col].ours
            if value is not None and distinct:
                rounded = round(value, 2)
                row.cells[col].mark = ("best" if rounded == distinct[0] else
                                       "second" if len(distinct) > 1 and rounded == distinct[1] else "")


def paper_marks(paper: Sequence[PaperRow]) -> dict[tuple[str, str], str]:
    """(row, column) -> "best" / "second" over the paper's own numbers (what the paper bolds/underlines)."""
    marks: dict[tuple[str, str], str] = {}
    for col in [c for c, _, _ in COLUMNS] + [AVG]:
        values = {p.row: (p.avg if col == AVG else p.values[col]) for p in paper}
        distinct = sorted({v for v in values.values() if v is not None}, reverse=True)
        for row, v in values.items():
            if v is not None and distinct and v == distinct[0]:
                marks[(row, col)] = "best"
            elif v is not None and len(distinct) > 1 and v == distinct[1]:
                marks[(row, col)] = "second"
    return marks


# ------------------------------------------------------------------------------------ rendering
def _fmt(value: float | None) -> str:
    return MISSING if value is None else f"{value:.2f}"


def _paper_value(row: TableRow, col: str) -> float | None:
    if row.paper is None:
        return None
    return row.paper.avg if col == AVG else row.paper.values.get(col)


def cell_text(row: TableRow, col: str, markdown: bool = True) -> str:
    """``ours↑ (paper, ±diff)``; ``— (paper)`` where ours is missing; best **bold**, second <u>underlined</u>."""
    cell = row.cells[col]
    ours = _fmt(cell.ours)
    if cell.ours is not None and markdown and cell.mark:
        ours = f"**{ours}**" if cell.mark == "best" else f"<u>{ours}</u>"
    elif cell.ours is not None and cell.mark:
        ours += "*" if cell.mark == "best" else "'"
    ours += cell.arrow
    paper = _paper_value(row, col)
    if paper is None:
        return ours
    diff = "" if cell.ours is None else f", {cell.ours - paper:+.2f}"
    return f"{ours} ({paper:.2f}{diff})"


def render_table2_markdown(table: Table2) -> str:
    header = ["Model", *(label for _, _, label in COLUMNS), "Avg"]
    lines = ["# Table 2: ours vs the paper", "",
             ("Each cell: ours x100 (the paper's value, ours minus the paper's). ↑/↓: against the row training "
             "started from (the base row; the tiny model's warm start). Per column over our rows: best **bold**, "
             "second-best <u>underlined</u>. Avg: mean of the eight columns, only when all eight are there. "
             f"{MISSING}: no number, reason in the notes below. Paper: arXiv 2508.08791, Table 2."), ""]
    section = None
    for row in table.rows:
        if row.section != section:
            section = row.section
            lines += ["", f"**{SECTION_TITLES.get(section, section)}**", "",
                      "| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        cells = [cell_text(row, col) for col, _, _ in COLUMNS] + [cell_text(row, AVG)]
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    lines += ["", "## Notes", ""]
    for row in table.rows:
        if row.filled:
            reasons = {f"{col}: {c.reason}" for col, c in row.cells.items() if c.ours is None and c.reason}
            lines.append(f"- {row.label}: from `{row.source}`" + (f"; {MISSING} " + "; ".join(sorted(reasons))
                                                                   if reasons else ""))
        else:
            lines.append(f"- {row.label}: {MISSING} {row.cells[COLUMNS[0][0]].reason}")
    lines += ["", "## Unmatched runs", ""]
    lines += [f"- `{what}`: {why}" for what, why in table.unmatched] or ["- none"]
    lines += ["", "## Metric names", "",
              ("Columns are these keys of `summary.json` / `eval/<checkpoint>/metrics.json`, x100; W&B has the same "
              "keys as `eval/<checkpoint>/<key>` (and `<key>` for the job's last checkpoint):"), ""]
    lines += [f"- {label}: `{key}`" for _, key, label in COLUMNS]
    return "\n".join(lines) + "\n"


def table2_csv(table: Table2) -> str:
    out = io.StringIO()
    cols = [c for c, _, _ in COLUMNS] + [AVG]
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["row", "section", "label", *(f"{c}{s}" for c in cols for s in ("", "_paper", "_diff", "_note")),
                     "source"])
    for row in table.rows:
        cells = []
        for col in cols:
            cell, paper = row.cells[col], _paper_value(row, col)
            diff = None if cell.ours is None or paper is None else cell.ours - paper
            note = " ".join(x for x in (cell.arrow, cell.mark, cell.reason if cell.ours is None else "") if x)
            cells += ["" if cell.ours is None else f"{cell.ours:.4f}", "" if paper is None else f"{paper:.2f}",
                      "" if diff is None else f"{diff:.4f}", note]
        writer.writerow([row.key, row.section, row.label, *cells, row.source])
    for what, why in table.unmatched:
        writer.writerow([f"unmatched:{what}", "unmatched", why])
    return out.getvalue()


def plot_table2(table: Table2, path: str | Path) -> None:
    """The table as a PNG (Agg canvas, no pyplot): ours (paper) per cell, best bold, ↑ green, ↓ red."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [r for r in table.rows if r.filled or r.paper is not None]
    cols = [c for c, _, _ in COLUMNS] + [AVG]
    header = ["Model", *(label for _, _, label in COLUMNS), "Avg"]
    text = [[r.label, *(cell_text(r, c, markdown=False).replace("*", "").replace("'", "") for c in cols)] for r in rows]
    fig = Figure(figsize=(13, 0.22 * (len(rows) + 1) + 0.4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    ax.axis("off")
    widget = ax.table(cellText=text or [[""] * len(header)], colLabels=header, loc="center", cellLoc="center")
    widget.auto_set_font_size(False)
    widget.set_fontsize(8)
    widget.auto_set_column_width(list(range(len(header))))
    for i, row in enumerate(rows, start=1):
        shade = {"closed": "#f4f4f4", "open_large": "#ffffff", "open_small": "#f4f8fb", "tiny": "#fff8e8"}
        for j, col in enumerate(["label", *cols]):
            cell = widget[i, j]
            cell.set_facecolor(shade.get(row.section, "#ffffff"))
            if col == "label":
                cell.get_text().set_ha("left")
                continue
            c = row.cells[col]
            if c.mark == "best":
                cell.get_text().set_fontweight("bold")
            elif c.mark == "second":
                cell.get_text().set_fontstyle("italic")
            if c.arrow:
                cell.get_text().set_color("#1a7f37" if c.arrow == "↑" else "#c0392b")
            if c.ours is None:
                cell.get_text().set_color("#888888")
    for j in range(len(header)):
        widget[0, j].get_text().set_fontweight("bold")
    ax.set_title("Table 2: ours (paper) x100; best bold, second italic; green up / red down vs the start of training",
                 fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def write_table2(table: Table2, out_dir: str | Path) -> dict[str, Path]:
    """``table2.md``, ``table2.csv``, ``table2.png`` and ``companions.md`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in ("table2.md", "table2.csv", "table2.png", "companions.md")}
    with atomic_write(paths["table2.md"]) as handle:
        handle.write(render_table2_markdown(table))
    with atomic_write(paths["table2.csv"], newline="") as handle:
        handle.write(table2_csv(table))
    plot_table2(table, paths["table2.png"])
    with atomic_write(paths["companions.md"]) as handle:
        handle.write(render_companions(table))
    return paths


# ------------------------------------------------------------------------------------ companions
def reasoning_table(table: Table2) -> tuple[list[str], list[list[str]]]:
    """Reasoning minus non-reasoning per model and variant, ours and the paper's (Avg and Solve-F1)."""
    header = ["model", "variant", *(label for _, _, label in COLUMNS), "Avg"]
    out = []
    rows = [r for r in table.rows if r.paper is not None]
    for row in rows:
        p = row.paper
        assert p is not None
        if p.mode != "reasoning":
            continue
        other = next((r for r in rows if r.paper and r.paper.model == p.model and r.paper.variant == p.variant
                      and r.paper.mode == "non_reasoning"), None)
        if other is None:
            continue
        cells = []
        for col in [c for c, _, _ in COLUMNS] + [AVG]:
            a, b = row.cells[col].ours, other.cells[col].ours
            pa, pb = _paper_value(row, col), _paper_value(other, col)
            ours = MISSING if a is None or b is None else f"{a - b:+.2f}"
            cells.append(ours + ("" if pa is None or pb is None else f" ({pa - pb:+.2f})"))
        out.append([p.model, TRAINED_VARIANTS.get(p.variant, "base"), *cells])
    return header, out


def breakdown_tables(table: Table2) -> list[tuple[str, list[str], list[list[str]]]]:
    """Per-scenario tables from our filled rows: own test F1 by scenario, ToolHop by mode, RoTBench by
    noise level (TS/PI/CF), τ-bench by domain. Groups are read from the metric keys present."""
    specs = (("Own test Solve-F1 by scenario", "ftrl_test", ("solve_f1",)),
             ("ToolHop AC by mode", "toolhop", ("ac",)),
             ("RoTBench by noise level (TS / PI / CF)", "rotbench", ("ts", "pi", "cf")),
             ("τ-bench Pass^1 by domain", "taubench", ("pass_1",)))
    filled = [r for r in table.rows if r.filled]
    result = []
    for title, bench, leaves in specs:
        groups: list[str] = []
        for row in filled:
            for key in row.metrics:
                parts = key.split("/")
                if len(parts) == 3 and parts[0] == bench and parts[2] == leaves[0] and parts[1] not in groups:
                    groups.append(parts[1])
        if not groups:
            continue
        body = []
        for row in filled:
            cells = []
            for group in groups:
                vals = [row.metrics.get(f"{bench}/{group}/{leaf}") for leaf in leaves]
                cells.append(" / ".join(MISSING if v is None else f"{100 * v:.2f}" for v in vals))
            if any(c.strip(" /" + MISSING) for c in cells):
                body.append([row.label, *cells])
        if body:
            result.append((title, ["model", *groups], body))
    return result


def general_table(table: Table2) -> tuple[list[str], list[list[str]]]:
    """General ability per task: accuracy x100, and for trained rows the change against their start row."""
    by_key = {r.key: r for r in table.rows}
    tasks: list[str] = []
    for row in table.rows:
        for key in row.metrics:
            parts = key.split("/")
            if len(parts) == 3 and parts[0] == "general" and parts[2] == "accuracy" and parts[1] not in tasks:
                tasks.append(parts[1])
    body = []
    for row in table.rows:
        if not row.filled or not any(f"general/{t}/accuracy" in row.metrics for t in tasks):
            continue
        ref = by_key.get(row.reference) if row.reference else None
        cells = []
        for task in tasks:
            acc = row.metrics.get(f"general/{task}/accuracy")
            base = ref.metrics.get(f"general/{task}/accuracy") if ref is not None else None
            if base is None and ref is not None:
                delta = row.metrics.get(f"general/{task}/delta_vs_base")
            else:
                delta = None if base is None or acc is None else acc - base
            text = MISSING if acc is None else f"{100 * acc:.2f}"
            cells.append(text + ("" if delta is None else f" ({100 * delta:+.2f})"))
        body.append([row.label, *cells])
    return ["model", *tasks], body


def _md_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])


def render_companions(table: Table2) -> str:
    parts = ["# Companion tables", ""]
    header, body = reasoning_table(table)
    parts += ["## Reasoning minus non-reasoning (ours, and the paper's in brackets)", "",
              "The paper observes that reasoning mode is not better for tool use (negative Avg).", "",
              _md_table(header, body) if body else "(no reasoning rows)", ""]
    for title, header, body in breakdown_tables(table):
        parts += [f"## {title} (x100)", "", _md_table(header, body), ""]
    header, body = general_table(table)
    parts += ["## General ability (accuracy x100; trained rows: change against the start of training)", "",
              _md_table(header, body) if body else f"{MISSING} no run evaluated `general`", ""]
    return "\n".join(parts)


# ------------------------------------------------------------------------------------ sweeps
def _overrides(run_dir: Path) -> dict[str, str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    items = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else []
    out = {}
    for item in items or []:
        key, _, value = str(item).lstrip("+~").partition("=")
        out[key] = value
    return out


def sweep_table(sweep_dir: str | Path) -> tuple[list[str], list[list[str]]]:
    """One row per job of a sweep directory: the swept keys, the checkpoint shown (the last one), the
    Table 2 columns any job has, and Avg when all eight are there."""
    sweep_dir = Path(sweep_dir)
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and _is_run_dir(p)) if sweep_dir.is_dir() else []
    overrides = {job: _overrides(job) for job in jobs}
    keys: list[str] = []
    for ov in overrides.values():
        keys += [k for k in ov if k not in keys]
    swept = [k for k in keys if len({ov.get(k) for ov in overrides.values()}) > 1] or keys
    runs = {job: load_run(job) for job in jobs}
    present = [(col, key, label) for col, key, label in COLUMNS
               if any(key in (run.evals.get(list(run.evals)[-1]) or {}) for run in runs.values() if run.evals)]
    header = ["job", *swept, "checkpoint", *(label for _, _, label in present), "Avg"]
    body = []
    for job in jobs:
        run = runs[job]
        last = list(run.evals)[-1] if run.evals else None
        metrics = run.evals.get(last, {}) if last else {}
        values = {col: (100 * metrics[key] if key in metrics else None) for col, key, _ in COLUMNS}
        cells = [_fmt(values[col]) for col, _, _ in present]
        status = last or ("unfinished" if run.summary is None else "no eval")
        body.append([job.name, *(overrides[job].get(k, "") for k in swept), status, *cells,
                     _fmt(mean_of_columns(values))])
    return header, body


def write_sweep_table(sweep_dir: str | Path) -> Path:
    """``sweep_table.md`` and ``sweep_table.csv`` in the sweep directory; returns the .md path."""
    sweep_dir = Path(sweep_dir)
    header, body = sweep_table(sweep_dir)
    md = sweep_dir / "sweep_table.md"
    with atomic_write(md) as handle:
        handle.write(f"# Sweep {sweep_dir}\n\nOne row per job, its last evaluated checkpoint, x100.\n\n"
                     + (_md_table(header, body) if body else "(no job directories)") + "\n")
    with atomic_write(sweep_dir / "sweep_table.csv", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(body)
    return md

