"""Paper tables from run directories: experiments/paper/table2.csv, `ftrl.report table2`, companions, sweeps.

Run directories are built by hand from fixtures (``summary.json`` + ``.hydra/config.yaml``); nothing
trains or evaluates.

    OMP_NUM_THREADS=1 python -m pytest tests/test_report.py -q
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ftrl.analysis.sweep_report import SweepReport
from ftrl.analysis.tables import (
    AVG,
    COLUMNS,
    build_table2,
    cell_text,
    find_runs,
    load_paper_table2,
    mean_of_columns,
    paper_marks,
    reasoning_table,
    render_companions,
    render_table2_markdown,
    sweep_table,
    table2_csv,
)
from ftrl.config import load_run_config
from ftrl.report import table2_report
from ftrl.tracking import eval_summary

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
KEYS = [key for _, key, _ in COLUMNS]
ALL_BENCHMARKS = ["ftrl_test", "toolhop", "taubench", "rotbench"]


def _metrics(scale: float, keys: list[str] = KEYS, **extra: float) -> dict[str, float]:
    """Every key at ``scale`` (x100 in the table), so a row's numbers are easy to read back."""
    return {**{k: scale for k in keys}, **extra}


def make_run(root: Path, name: str, *, model: str, mode: str = "non_reasoning", algorithm: str = "grpo",
             freeze: str = "none", reward: str = "solve_f1", stages: list[str] | None = None, rounds: int = 3,
             benchmarks: list[str] = ALL_BENCHMARKS, evals: dict[str, dict[str, float]] | None = None,
             model_path: str | None = None, leaf: str = "base", overrides: list[str] | None = None) -> Path:
    run = root / name / leaf
    (run / ".hydra").mkdir(parents=True)
    config = {"name": name, "model": {"name": model, "path": model_path}, "mode": {"name": mode},
              "algorithm": {"name": algorithm}, "freeze": {"name": freeze}, "reward": {"name": reward},
              "stages": stages or ["build_envs", "collect", "train", "eval", "analyze"], "train": {"rounds": rounds},
              "eval": {"benchmarks": benchmarks}}
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides or []))
    if evals is not None:
        summary = {"evals": [{"checkpoint": c, "metrics": m} for c, m in evals.items()],
                   "eval_settings": {"benchmarks": benchmarks}, "run_dir": str(run)}
        (run / "summary.json").write_text(json.dumps(summary))
    return run


# ------------------------------------------------------------------------------------ the paper's numbers
def test_paper_table2_has_every_row_and_avg_is_the_mean_of_the_eight_columns() -> None:
    rows = load_paper_table2()
    assert len(rows) == 27
    assert [sum(r.section == s for r in rows) for s in ("closed", "open_large", "open_small")] == [5, 4, 18]
    numbered = [r for r in rows if all(v is not None for v in r.values.values()) and r.avg is not None]
    assert numbered, "experiments/paper/table2.csv has no complete row"
    for row in numbered:
        assert mean_of_columns(row.values) == pytest.approx(row.avg, abs=0.006), row.row
    assert len({r.row for r in rows}) == 27


def test_paper_marks_are_the_papers_bold_and_underline() -> None:
    marks = paper_marks(load_paper_table2())
    best = {col: row for (row, col), m in marks.items() if m == "best"}
    second = {col: row for (row, col), m in marks.items() if m == "second"}
    assert best == {"solve_p": "gemini25_flash", "solve_r": "qwen3_14b_reinforce_pp", "solve_f1": "qwen3_14b_grpo",
                    "toolhop_ac": "claude40_sonnet", "taubench_pass_1": "claude40_sonnet", "rotbench_ts": "gpt4o",
                    "rotbench_pi": "gpt4o", "rotbench_cf": "gpt4o", AVG: "qwen3_8b_grpo"}
    assert second == {"solve_p": "gemini25_pro", "solve_r": "qwen3_14b_grpo", "solve_f1": "qwen3_8b_grpo",
                      "toolhop_ac": "qwen3_32b_reasoning", "taubench_pass_1": "gemini25_pro",
                      "rotbench_ts": "qwen3_8b_reinforce_pp", "rotbench_pi": "qwen25_14b_reinforce_pp",
                      "rotbench_cf": "qwen25_14b_reinforce_pp", AVG: "qwen3_14b_grpo"}


def test_empty_paper_cells_read_as_missing(tmp_path: Path) -> None:
    text = (ROOT / "experiments" / "paper" / "table2.csv").read_text().splitlines()
    header, first = text[0].split(","), text[1].split(",")
    for col in ("solve_p", "avg"):
        first[header.index(col)] = "" if col == "avg" else "—"
    (tmp_path / "t.csv").write_text("\n".join([text[0], ",".join(first)]) + "\n")
    (row,) = load_paper_table2(tmp_path / "t.csv")
    assert row.values["solve_p"] is None and row.avg is None and mean_of_columns(row.values) is None
    table = build_table2([], [row])
    assert cell_text(table.rows[0], "solve_p") == "—"


def _compose(overrides: list[str]) -> Any:
    import ftrl.run  # noqa: F401  (registers the ftrl_dirname resolver)

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return load_run_config(compose(config_name="config", overrides=["run_dir=/tmp/ftrl-test-run", *overrides]))


@pytest.mark.parametrize("row", load_paper_table2(), ids=lambda r: r.row)
def test_each_row_names_an_experiment_whose_config_maps_back_to_it(row: Any) -> None:
    experiment, *extra = row.experiment.split()
    assert (CONF / "experiment" / f"{experiment}.yaml").is_file(), row.experiment
    cfg = _compose([f"+experiment={experiment}", *extra])
    assert cfg.mode.name == row.mode
    if row.model.startswith("api:"):
        assert cfg.model.name == "api" and cfg.model.path in row.model[4:].split("|")
    else:
        assert cfg.model.name == row.model
    if row.variant == "base":  # eval-only: no training, every Table 2 benchmark plus General
        assert "train" not in cfg.stages and "eval" in cfg.stages
        assert set(cfg.eval.benchmarks) >= {"ftrl_test", "toolhop", "taubench", "rotbench", "general"}
    else:
        assert cfg.algorithm.name == row.variant and "train" in cfg.stages and cfg.freeze.name == "none"


# ------------------------------------------------------------------------------------ Table 2
@pytest.fixture
def runs(tmp_path: Path) -> dict[str, Path]:
    out = tmp_path / "outputs"
    return {
        # a trained run: base row + FTRL-GRPO row
        "trained": make_run(out, "qwen3_8b_grpo", model="qwen3_8b",
                            evals={"base": _metrics(0.20), "round1": _metrics(0.30), "round2": _metrics(0.40),
                                   "round3": {**_metrics(0.50), "rotbench/ts": 0.10}}),
        # Reinforce++ of the same model, own test only
        "own_test_only": make_run(out, "qwen3_8b_reinforce_pp", model="qwen3_8b", algorithm="reinforce_pp",
                                  benchmarks=["ftrl_test"],
                                  evals={"base": _metrics(0.25, KEYS[:3]), "round3": _metrics(0.45, KEYS[:3])}),
        # eval-only, reasoning mode, ToolHop only
        "eval_only": make_run(out, "eval_qwen3_8b_reasoning", model="qwen3_8b", mode="reasoning",
                              stages=["build_envs", "eval"], benchmarks=["toolhop"],
                              evals={"base": {"toolhop/ac": 0.40}}),
        "api": make_run(out, "eval_api", model="api", model_path="gpt-4o-2024-08-06", stages=["eval"],
                        evals={"base": _metrics(0.35)}, leaf="model.path=gpt-4o-2024-08-06"),
        # unmatched: an ablation, PPO, a mode the paper has no row for, an unknown API id
        "ablation": make_run(out, "freeze_ablation", model="qwen25_7b", freeze="lower_mlp_only",
                             evals={"base": _metrics(0.1), "round3": _metrics(0.2)}),
        "ppo": make_run(out, "algorithm_ablation", model="qwen25_14b", algorithm="ppo",
                        evals={"round3": _metrics(0.2)}),
        "no_row": make_run(out, "odd", model="qwen25_7b", mode="reasoning", evals={"base": _metrics(0.1)}),
        "unknown_api": make_run(out, "eval_api", model="api", model_path="mystery-1", stages=["eval"],
                                evals={"base": _metrics(0.1)}, leaf="model.path=mystery-1"),
        # unfinished: no summary yet; a trained run at round 1 of 3
        "unfinished": make_run(out, "qwen3_14b_grpo", model="qwen3_14b", evals=None),
        "early": make_run(out, "qwen25_14b_grpo", model="qwen25_14b",
                          evals={"base": _metrics(0.3), "round1": _metrics(0.35)}),
        # the tiny model: rows of its own, arrows against the warm start
        "tiny": make_run(out, "default", model="tiny",
                         evals={"base": _metrics(0.0, KEYS[:3]), "warmup": _metrics(0.40, KEYS[:3]),
                                "round3": _metrics(0.55, KEYS[:3])}),
    }


def test_rows_are_mapped_from_each_runs_config(runs: dict[str, Path]) -> None:
    table = build_table2(list(runs.values()))
    filled = {r.key: r.source for r in table.rows if r.filled}
    assert filled["qwen3_8b"] == f"{runs['trained']} [base]"
    assert filled["qwen3_8b_grpo"] == f"{runs['trained']} [round3]"
    assert filled["qwen3_8b_reinforce_pp"] == f"{runs['own_test_only']} [round3]"
    assert filled["qwen3_8b_reasoning"] == f"{runs['eval_only']} [base]"
    assert filled["gpt4o"] == f"{runs['api']} [base]"
    assert filled["qwen25_14b"] == f"{runs['early']} [base]"
    assert filled["qwen25_7b"] == f"{runs['ablation']} [base]"  # the ablation's base is the base model
    tiny = [k for k in filled if k.startswith("tiny:")]
    assert [k.rsplit(":", 1)[1] for k in tiny] == ["base", "warmup", "round3"]
    # the second run of Qwen3-8B's base row is reported, not silently used or dropped
    filled_by = f"row 'Qwen3-8B Non-Reasoning' is already filled by {runs['trained']} [base]"
    assert (f"{runs['own_test_only']} [base]", filled_by) in table.unmatched


def test_runs_that_match_no_row_are_reported_with_the_reason(runs: dict[str, Path], tmp_path: Path) -> None:
    paths, bad = find_runs([*map(str, runs.values()), str(tmp_path / "nowhere")])
    table = build_table2(paths, unmatched=bad)
    reasons = dict(table.unmatched)
    assert reasons[f"{runs['ablation']} [trained checkpoints]"] == "freeze=lower_mlp_only is an ablation, not a Table 2 row"
    assert reasons[f"{runs['ppo']} [trained checkpoints]"] == "algorithm=ppo has no Table 2 row"
    assert reasons[str(runs["no_row"])] == "no Table 2 row for model qwen25_7b in mode reasoning"
    assert reasons[str(runs["unknown_api"])] == "API model 'mystery-1' (non_reasoning) is not a Table 2 row"
    assert reasons[str(runs["unfinished"])] == "run unfinished: no summary.json yet"
    assert reasons[f"{runs['early']} [trained checkpoints]"] == "run unfinished: round1 evaluated of 3 rounds"
    assert reasons[str(tmp_path / "nowhere")] == "no such path"
    md = render_table2_markdown(table)
    assert "## Unmatched runs" in md and "freeze=lower_mlp_only is an ablation" in md


def test_cells_avg_arrows_marks_and_missing_reasons(runs: dict[str, Path]) -> None:
    table = build_table2(list(runs.values()))
    grpo, base = table.row("qwen3_8b_grpo"), table.row("qwen3_8b")
    assert grpo.cells["solve_f1"].ours == pytest.approx(50.0)
    assert cell_text(grpo, "solve_f1") == "<u>50.00</u>↑ (49.54, +0.46)"   # second of our rows, up on base
    assert cell_text(grpo, "rotbench_ts") == "10.00↓ (77.62, -67.62)"      # down on base (20.00)
    assert grpo.cells[AVG].ours == pytest.approx((7 * 50 + 10) / 8)
    assert cell_text(base, "solve_p") == "20.00 (21.18, -1.18)"
    assert base.cells[AVG].ours == pytest.approx(20.0)
    # marks rank our rows: the tiny round 3 row (55) is best, this one (50) second
    tiny_r3 = next(r for r in table.rows if r.key.endswith(":round3"))
    assert tiny_r3.cells["solve_f1"].mark == "best" and grpo.cells["solve_f1"].mark == "second"
    assert cell_text(grpo, "solve_f1", markdown=False) == "50.00'↑ (49.54, +0.46)"
    # own test only: the other columns say why they are empty, and Avg needs all eight
    rpp = table.row("qwen3_8b_reinforce_pp")
    assert rpp.cells["toolhop_ac"].ours is None
    assert rpp.cells["toolhop_ac"].reason == "toolhop not run (eval.benchmarks=['ftrl_test'])"
    assert rpp.cells[AVG].ours is None and rpp.cells[AVG].reason == "needs all eight columns (5 missing)"
    assert cell_text(rpp, "toolhop_ac") == "— (37.79)"
    # tiny: arrows against the warm start, not the untrained base
    assert tiny_r3.cells["solve_f1"].arrow == "↑" and tiny_r3.cells["solve_p"].arrow == "↑"
    # rows no run fills name the command that would
    assert table.row("qwen25_72b").cells["solve_p"].reason == "not run: python -m ftrl.run +experiment=eval_qwen25_72b"
    assert table.row("qwen3_14b_grpo").cells["solve_p"].reason == "run unfinished: no summary.json yet"


def test_the_markdown_and_csv_tables_are_pinned(runs: dict[str, Path]) -> None:
    table = build_table2([runs["trained"], runs["eval_only"]])
    md = render_table2_markdown(table)
    assert ("| Qwen3-8B FTRL-GRPO | **50.00**↑ (46.44, +3.56) | **50.00**↑ (55.84, -5.84) | **50.00**↑ (49.54, +0.46) "
            "| **50.00**↑ (38.93, +11.07) | **50.00**↑ (23.35, +26.65) | <u>10.00</u>↓ (77.62, -67.62) "
            "| **50.00**↑ (44.67, +5.33) | **50.00**↑ (27.05, +22.95) | **45.00**↑ (45.43, -0.43) |") in md
    assert ("| Qwen3-8B Reasoning | — (27.78) | — (38.38) | — (29.52) | <u>40.00</u> (40.70, -0.70) | — (16.43) "
            "| — (54.00) | — (34.29) | — (20.38) | — (32.68) |") in md
    assert "- Qwen3-8B Reasoning: from" in md and "ftrl_test not run (eval.benchmarks=['toolhop'])" in md
    assert "- Qwen2.5-72B Instruct: — not run: python -m ftrl.run +experiment=eval_qwen25_72b" in md
    rows = {line.split(",")[0]: line for line in table2_csv(table).splitlines()}
    assert rows["qwen3_8b_grpo"].startswith("qwen3_8b_grpo,open_small,Qwen3-8B FTRL-GRPO,50.0000,46.44,3.5600,↑ best,")
    assert rows["qwen25_72b"].split(",")[3:7] == ["", "31.68", "", "not run: python -m ftrl.run +experiment=eval_qwen25_72b"]


def test_companion_tables(runs: dict[str, Path], tmp_path: Path) -> None:
    general_base = {"general/mmlu/accuracy": 0.6, "general/gsm8k/accuracy": 0.5}
    general_r3 = {"general/mmlu/accuracy": 0.62, "general/gsm8k/accuracy": 0.45}
    scen = {"ftrl_test/Single-Hop/solve_f1": 0.7, "toolhop/Direct/ac": 0.3, "rotbench/clean/ts": 0.9,
            "rotbench/clean/pi": 0.5, "rotbench/clean/cf": 0.2, "taubench/airline/pass_1": 0.25}
    trained = make_run(tmp_path / "o", "qwen3_14b_grpo", model="qwen3_14b", benchmarks=ALL_BENCHMARKS + ["general"],
                       evals={"base": _metrics(0.30, **general_base),
                              "round3": _metrics(0.50, **general_r3, **scen)})
    reasoning = make_run(tmp_path / "o", "qwen3_14b_reasoning_grpo", model="qwen3_14b", mode="reasoning",
                         evals={"base": _metrics(0.25), "round3": _metrics(0.40)})
    table = build_table2([trained, reasoning])
    header, body = reasoning_table(table)
    grpo = next(r for r in body if r[0] == "qwen3_14b" and r[1] == "FTRL-GRPO")
    assert grpo[header.index("Solve-F1")] == "-10.00 (-8.46)"
    assert grpo[header.index("Avg")] == "-10.00 (-4.13)"
    base = next(r for r in body if r[0] == "qwen3_14b" and r[1] == "base")
    assert base[header.index("Solve-P")] == "-5.00 (+3.62)"
    md = render_companions(table)
    assert "| Qwen3-14B FTRL-GRPO | 70.00 |" in md                       # own test by scenario
    assert "| Qwen3-14B FTRL-GRPO | 90.00 / 50.00 / 20.00 |" in md       # RoTBench by level: TS / PI / CF
    assert "| Qwen3-14B FTRL-GRPO | 25.00 |" in md                       # τ-bench by domain
    assert "| Qwen3-14B FTRL-GRPO | 62.00 (+2.00) | 45.00 (-5.00) |" in md  # general: change against base
    assert "| Qwen3-14B Non-Reasoning | 60.00 | 50.00 |" in md


# ------------------------------------------------------------------------------------ CLI and outputs
def test_table2_command_writes_md_csv_png_and_companions(runs: dict[str, Path], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "report"
    table2_report([str(runs["trained"].parent.parent / "*" / "*")], out=out)
    assert sorted(p.name for p in out.iterdir()) == ["companions.md", "table2.csv", "table2.md", "table2.png"]
    assert (out / "table2.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "Qwen3-8B FTRL-GRPO" in printed and "unmatched (not in the table):" in printed
    assert f"wrote {out / 'table2.md'}" in printed


def test_cli_table2_and_the_single_run_form_still_works(runs: dict[str, Path], tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "ftrl.report", "table2", str(runs["trained"]), "--out",
                          str(tmp_path / "r")], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "r" / "table2.md").is_file()
    single = subprocess.run([sys.executable, "-m", "ftrl.report", str(runs["trained"])], cwd=ROOT,
                            capture_output=True, text=True, timeout=120, check=False)
    assert single.returncode == 0, single.stderr
    assert "Own test set (ftrl_test), x100:" in single.stdout and "round3" in single.stdout


# ------------------------------------------------------------------------------------ sweeps
def _sweep(tmp_path: Path) -> Path:
    sweep = tmp_path / "multirun" / "tiny_algorithm_ablation"
    for algorithm, score in (("grpo", 0.5), ("reinforce_pp", 0.4)):
        job = make_run(sweep.parent, sweep.name, model="tiny", algorithm=algorithm, benchmarks=["ftrl_test"],
                       leaf=f"debug=smoke,algorithm={algorithm}", overrides=["+debug=smoke", f"algorithm={algorithm}"],
                       evals={"base": _metrics(0.0, KEYS[:3]), "round2": _metrics(score, KEYS[:3])})
        assert job.parent == sweep
    make_run(sweep.parent, sweep.name, model="tiny", algorithm="ppo", leaf="debug=smoke,algorithm=ppo",
             overrides=["+debug=smoke", "algorithm=ppo"], evals=None)
    return sweep


def test_sweep_table_has_one_row_per_job_with_the_swept_keys(tmp_path: Path) -> None:
    header, body = sweep_table(_sweep(tmp_path))
    assert header == ["job", "algorithm", "checkpoint", "Solve-P", "Solve-R", "Solve-F1", "Avg"]
    assert body == [["debug=smoke,algorithm=grpo", "grpo", "round2", "50.00", "50.00", "50.00", "—"],
                    ["debug=smoke,algorithm=ppo", "ppo", "unfinished", "—", "—", "—", "—"],
                    ["debug=smoke,algorithm=reinforce_pp", "reinforce_pp", "round2", "40.00", "40.00", "40.00", "—"]]


def test_the_hydra_callback_writes_the_sweep_table(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sweep = _sweep(tmp_path)
    SweepReport().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))
    assert "| debug=smoke,algorithm=grpo | grpo | round2 | 50.00 |" in (sweep / "sweep_table.md").read_text()
    assert (sweep / "sweep_table.csv").read_text().splitlines()[0] == "job,algorithm,checkpoint,Solve-P,Solve-R,Solve-F1,Avg"
    assert f"sweep table: {sweep / 'sweep_table.md'}" in capsys.readouterr().out
    out = subprocess.run([sys.executable, "-m", "ftrl.report", "sweep", str(sweep)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=False)
    assert out.returncode == 0 and f"sweep table: {sweep / 'sweep_table.md'}" in out.stdout, out.stderr


def test_the_callback_is_registered_for_every_multirun() -> None:
    import ftrl.run  # noqa: F401

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["run_dir=/tmp/x"], return_hydra_config=True)
    assert cfg.hydra.callbacks.sweep_report._target_ == "ftrl.analysis.sweep_report.SweepReport"


# ------------------------------------------------------------------------------------ W&B names
def test_wandb_summary_carries_the_table_keys_of_every_checkpoint() -> None:
    evals = {"base": _metrics(0.2), "round3": _metrics(0.5)}
    summary = eval_summary(evals)
    for key in KEYS:
        assert summary[f"eval/base/{key}"] == 0.2 and summary[f"eval/round3/{key}"] == 0.5
        assert summary[key] == 0.5  # the last checkpoint under the summary.json key, as table2 reads it
