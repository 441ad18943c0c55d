"""``python -m ftrl.bench --quick``: every stage runs, bench.json follows its schema, the checks hold.

The quick mode builds its own small world (smoke-sized model, a short warm start), runs the four
stages and compares each with its baseline in the same process; greedy episodes must equal the
one-conversation-at-a-time HF ``generate`` loop's, the sampled collection batched ``generate``'s.

    OMP_NUM_THREADS=1 python -m pytest tests/test_bench.py -q
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ftrl.bench.report import REQUIRED_KEYS, Measure, check_schema, format_table

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("bench")
    result = subprocess.run([sys.executable, "-m", "ftrl.bench", "--quick", "--out", str(out), "--threads", "1"],
                            check=False, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (out / "machine.json").is_file()
    return json.loads((out / "bench.json").read_text()), result.stdout


def test_quick_bench_writes_every_stage_in_the_schema(quick_run: tuple[dict, str]) -> None:
    records, stdout = quick_run
    assert {"sandbox", "episodes", "train", "analysis"} <= set(records)
    assert check_schema(records) == []
    for name, record in records.items():
        assert set(REQUIRED_KEYS) <= set(record), name
        assert record["ours"] > 0 and record["baseline"] > 0, name
        assert record["ratio"] == pytest.approx(record["ours"] / record["baseline"]), name
        assert name in stdout
    assert records["train"]["higher_is_better"] is False and records["episodes"]["higher_is_better"] is True
    assert records["sandbox"]["limit"] >= records["sandbox"]["ours"] * 0.5


def test_quick_bench_greedy_outputs_matched(quick_run: tuple[dict, str]) -> None:
    records, _ = quick_run
    episodes = records["episodes"]
    assert episodes["checks"]["greedy_outputs_equal"] is True
    assert episodes["checks"]["rss_flat"] is True
    assert records["episodes.collect"]["checks"]["sampled_equal_to_batched_generate"] is True
    # The world's model calls tools, so the episodes have several turns (the prefix cache is used).
    ours = episodes["details"]["ours"]
    assert ours["calls"] > 0 and ours["turns"] > 12  # 12 quick episodes, more turns than that
    assert episodes["details"]["prefix_cache"]["hits"] > 0
    assert records["sandbox"]["checks"]["outputs_equal"] is True
    assert records["train.sft"]["checks"]["same_loss"] is True


def test_schema_check_names_what_is_wrong() -> None:
    good = Measure("x", "x", "what", "unit", 2.0, 4.0, "base").record()
    assert check_schema({"x": good}) == []
    assert check_schema({"x": {**good, "ratio": 3.0}}) == ["x: ratio 3.0 != ours / baseline"]
    assert "missing ['unit']" in check_schema({"x": {k: v for k, v in good.items() if k != "unit"}})[0]
    failed = Measure("y", "y", "what", "unit", 1.0, 1.0, "base", checks={"equal": False}).record()
    assert check_schema({"y": failed}) == ["y: checks failed: ['equal']"]
    table = format_table([Measure("x", "x", "what", "s", 2.0, 4.0, "base", higher_is_better=False)])
    assert "0.50x" in table and "lower is better" in table
