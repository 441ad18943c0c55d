"""Logs without a terminal (SLURM, ``> log 2>&1``): plain progress lines instead of ``\\r`` bars, no
library bars, and the results table in ``run.log`` (issue 15, item 10).

    python -m pytest tests/test_progress.py -q
"""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ftrl.progress import PlainProgress, progress, progress_mode, quiet_library_bars
from ftrl.report import print_results, results_table

ROOT = Path(__file__).resolve().parent.parent


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_mode_follows_the_terminal_and_the_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FTRL_PROGRESS", raising=False)
    assert progress_mode(TTY()) == "bar"
    assert progress_mode(io.StringIO()) == "plain"  # a redirected stream: a file, a pipe, SLURM's log
    monkeypatch.setenv("FTRL_PROGRESS", "plain")
    assert progress_mode(TTY()) == "plain"
    monkeypatch.setenv("FTRL_PROGRESS", "off")
    assert progress_mode(TTY()) == "off"


def test_plain_lines_every_10_percent_at_most_every_5_s_and_a_final_one(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    bar = PlainProgress(total=128, desc="collect r1", unit="ep", clock=clock)
    with caplog.at_level(logging.INFO, logger="ftrl.progress"):
        for _ in range(128):
            clock.now += 1.0  # 1 s per episode: 12.8 s per 10 %, so each boundary gets its line
            bar.update(1)
            bar.set_postfix(active=16, pending=48)
        bar.close()
    lines = [record.getMessage() for record in caplog.records if record.name == "ftrl.progress"]
    assert lines == bar.lines
    assert len(lines) == 10  # 10%, 20% ... 90%, 100%
    assert lines[4] == "collect r1: 64/128 ep (50%) in 1 min 04 s, eta 1 min 04 s; active=16, pending=48"
    assert lines[-1] == "collect r1: 128/128 ep (100%) in 2 min 08 s; active=16, pending=48"
    assert not any("\r" in line or len(line) > 200 for line in lines)


def test_fast_bars_log_only_their_end_and_slow_ones_at_least_once_a_minute() -> None:
    clock = FakeClock()
    fast = PlainProgress(range(10), desc="warmup", unit="step", clock=clock)
    for _ in fast:
        clock.now += 0.1  # 1 s in all: only the final line
    assert fast.lines == ["warmup: 10/10 step (100%) in 1.0 s"]

    slow = PlainProgress(total=1000, desc="train r2", unit="step", initial=500, clock=clock)
    start = clock.now
    for _ in range(3):
        clock.now += 61.0  # 0.1 % per update, a minute apart: the time rule reports it
        slow.update(1)
    assert [line.split(" in ")[0] for line in slow.lines] == [f"train r2: {n}/1000 step (50%)" for n in (501, 502, 503)]
    assert clock.now - start == 183.0
    unknown = PlainProgress(desc="episodes", unit="ep", clock=clock)
    unknown.update(3)
    unknown.close()
    assert unknown.lines == ["episodes: 3 ep in 0.0 s"]


def test_progress_gives_tqdm_on_a_terminal_and_plain_lines_otherwise() -> None:
    from tqdm.auto import tqdm

    bar = progress(total=3, desc="x", mode="bar")
    assert isinstance(bar, tqdm)
    bar.close()
    assert isinstance(progress(total=3, desc="x", mode="plain"), PlainProgress)
    silent = progress(total=3, desc="x", mode="off")
    silent.update(3)
    silent.close()
    assert silent.lines == []
    disabled = progress(total=3, desc="x", disable=True, mode="plain")
    disabled.update(3)
    disabled.close()
    assert disabled.lines == []


@pytest.mark.filterwarnings("ignore:Cannot enable progress bars")  # huggingface_hub read the switch at import
def test_library_bars_are_turned_off_without_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    transformers.utils.logging.enable_progress_bar()
    assert quiet_library_bars("bar") is False
    assert transformers.utils.logging.is_progress_bar_enabled()
    assert quiet_library_bars("plain") is True
    assert not transformers.utils.logging.is_progress_bar_enabled()
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS")
    import huggingface_hub

    huggingface_hub.utils.enable_progress_bars()
    transformers.utils.logging.enable_progress_bar()


SCRIPT = """
import logging, sys
sys.stderr.isatty = lambda: False
from ftrl.progress import progress
from ftrl.llm.models import load_model_and_tokenizer  # imports transformers
import transformers
for _ in progress(range(3), desc="copy pretraining", unit="step"):
    pass
print("library bars on:", transformers.utils.logging.is_progress_bar_enabled(), flush=True)
"""


def test_a_redirected_run_writes_lines_not_carriage_returns(tmp_path: Path) -> None:
    """The situation of a SLURM job: stdout and stderr go to one file."""
    log_file = tmp_path / "slurm.out"
    with open(log_file, "w") as handle:
        env = {**os.environ, "FTRL_PROGRESS": ""}
        code = "import logging; logging.basicConfig(level=logging.INFO, format='%(name)s %(message)s')\n" + SCRIPT
        subprocess.run([sys.executable, "-c", code], stdout=handle, stderr=subprocess.STDOUT, check=True, cwd=ROOT,
                       env=env, timeout=120)
    text = log_file.read_text()
    assert "\r" not in text
    assert "ftrl.progress copy pretraining: 3/3 step (100%)" in text
    assert "library bars on: False" in text


def test_the_results_table_goes_to_the_log_file_once(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """print_results prints the table and hands it to the root logger's file handlers (Hydra's run.log)."""
    run_log = tmp_path / "run.log"
    handler = logging.FileHandler(run_log)
    handler.setFormatter(logging.Formatter("[%(name)s][%(levelname)s] %(message)s"))
    console_stream = io.StringIO()
    console = logging.StreamHandler(console_stream)
    root = logging.getLogger()
    root.addHandler(handler)
    root.addHandler(console)
    summary = {"run_dir": str(tmp_path), "evals": [
        {"checkpoint": "base", "metrics": {"ftrl_test/solve_p": 1.0, "ftrl_test/solve_f1": 0.0}},
        {"checkpoint": "round1", "metrics": {"ftrl_test/solve_p": 0.5, "ftrl_test/solve_f1": 0.25}},
    ]}
    try:
        print_results(summary)
    finally:
        root.removeHandler(handler)
        root.removeHandler(console)
        handler.close()
    printed = capsys.readouterr().out
    logged = run_log.read_text()
    for text in (printed, logged):
        assert "Own test set (ftrl_test), x100:" in text
        assert results_table(summary["evals"]) in text
        assert f"run directory: {tmp_path}" in text
    assert logged.startswith("[ftrl.report][INFO] results:")
    assert console_stream.getvalue() == ""  # the console has the printed table only, not a second copy
