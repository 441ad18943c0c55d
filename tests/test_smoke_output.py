"""What a run tells its reader (issue 15, item 12): a smoke run says it checks plumbing, not learning;
the "no tool call" warning comes once per round; the heat-map shows embeddings and the LM head; the
reward curve has integer steps, a legend in words and the reward variant in its title.

    python -m pytest tests/test_smoke_output.py -q
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from safetensors.torch import save_file

from ftrl.analysis.param_delta import HEATMAP_PNG, aggregate, analyze_checkpoints, param_delta
from ftrl.analysis.plots import delta_heatmap_figure, reward_curve_figure
from ftrl.report import print_results, smoke_note
from ftrl.train.native import NoCallWatch

torch.set_num_threads(1)


def _run_dir(tmp_path: Path, overrides: list[str]) -> Path:
    hydra = tmp_path / "run" / ".hydra"
    hydra.mkdir(parents=True)
    (hydra / "overrides.yaml").write_text("".join(f"- {item}\n" for item in overrides) or "[]\n")
    return hydra.parent


def test_a_smoke_run_says_it_checks_plumbing_and_names_the_run_that_shows_learning(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    smoke = _run_dir(tmp_path / "a", ["+debug=smoke", "seed=1"])
    evals = [{"checkpoint": name, "metrics": {"ftrl_test/solve_p": 1.0, "ftrl_test/solve_r": 0.0,
                                              "ftrl_test/solve_f1": 0.0}} for name in ("base", "round2")]
    print_results({"run_dir": str(smoke), "evals": evals})
    out = capsys.readouterr().out
    assert "checks the plumbing" in out and "not\n  learning" in out
    assert max(len(line) for line in out.splitlines() if "---" not in line and "Solve" not in line) <= 110
    assert "`python -m ftrl.run`" in out and "about 9.5 minutes on 2 cores" in out
    assert out.index("Own test set") < out.index("note: +debug=smoke") < out.index("run directory:")

    plain = _run_dir(tmp_path / "b", ["algorithm=ppo"])
    print_results({"run_dir": str(plain), "evals": evals})
    assert "plumbing" not in capsys.readouterr().out
    assert smoke_note(None) is None and smoke_note(tmp_path / "nowhere") is None


def test_the_no_tool_call_warning_comes_once_per_round(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="ftrl.train.native"):
        for round_k in (1, 2):
            watch = NoCallWatch(round_k)
            for step in range(4):
                watch.observe(step, {"reward/calls": 0.0 if step != 2 else 0.5})
            watch.finish()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2  # one per round, not one per step
    assert warnings[0].startswith("round 1 step 0: no sampled turn made a tool call")
    assert "warned once per round" in warnings[0]
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert infos == ["round 1: 3 of 4 steps had no sampled tool call", "round 2: 3 of 4 steps had no sampled tool call"]
    quiet = NoCallWatch(3)
    quiet.observe(0, {"reward/calls": 1.0})
    caplog.clear()
    quiet.finish()
    assert caplog.records == []


def _checkpoint(directory: Path, tensors: dict[str, torch.Tensor]) -> Path:
    directory.mkdir(parents=True)
    save_file(tensors, str(directory / "model.safetensors"))
    return directory


def test_the_heatmap_shows_embeddings_and_lm_head_when_they_moved_most(tmp_path: Path) -> None:
    base = {"model.embed_tokens.weight": torch.ones(8, 4), "lm_head.weight": torch.ones(8, 4),
            "model.norm.weight": torch.ones(4)}
    for layer in range(2):
        for module in ("self_attn.q_proj", "mlp.up_proj"):
            base[f"model.layers.{layer}.{module}.weight"] = torch.ones(4, 4)
    target = {name: value.clone() for name, value in base.items()}
    target["model.embed_tokens.weight"] += 0.5  # the embedding moves most ...
    target["lm_head.weight"][0] += 1.0  # ... then the LM head ...
    target["model.layers.0.mlp.up_proj.weight"] += 0.01  # ... the layers hardly
    first, second = _checkpoint(tmp_path / "base", base), _checkpoint(tmp_path / "target", target)

    numbers = analyze_checkpoints(first, second, tmp_path / "out", label="base -> target", num_layers=2)
    assert numbers["share_outside_layers"] > 0.99
    assert numbers["top_cells"][0]["label"] == "embed"
    assert (tmp_path / "out" / HEATMAP_PNG).stat().st_size > 5000

    aggregated = aggregate(param_delta(first, second))
    figure = delta_heatmap_figure(aggregated.rel_changes(), title="t", note="outside: 99.9%")
    main, side, _colorbar = figure.axes
    labels = [label.get_text() for label in side.get_yticklabels()]
    assert labels == ["embed", "final norm", "lm_head"]
    side_values = [text.get_text() for text in side.texts]
    assert side_values == ["0.5", "0", "0.35"]  # rel change: embed 0.5, norm 0, lm_head 2/sqrt(32)
    # one colour scale for both panels: the embedding sets its top
    assert main.images[0].get_clim() == side.images[0].get_clim() == pytest.approx((0.0, 0.5))
    assert main.get_title(loc="left") == "t\noutside: 99.9%"


def test_the_reward_curve_has_integer_steps_a_legend_in_words_and_the_reward_variant() -> None:
    rows = [{"round": 1 + step // 3, "step": step + 1, "reward/score": 0.1 * step, "reward/score_std": 0.05,
             "reward/solved": 0.02 * step, "reward/malformed": 0.3, "reward/calls": 0.5}
            for step in range(6)]
    figure = reward_curve_figure(rows, reward_name="solve_f1")
    FigureCanvasAgg(figure).draw()
    top, bottom = figure.axes
    assert top.get_title() == "training reward (reward: solve_f1)"
    legend = [text.get_text() for text in top.get_legend().get_texts()]
    assert legend == ["sampled reward (mean per step)", "+-1 std across samples", "round boundary"]
    parts = [text.get_text() for text in bottom.get_legend().get_texts()]
    assert parts == ["sub-answers solved per turn", "turns with malformed calls (fraction)", "tool calls per turn"]
    assert bottom.get_xlabel() == "training step (all rounds)"
    for axes in (top, bottom):
        ticks = [tick for tick in axes.get_xticks() if axes.get_xlim()[0] <= tick <= axes.get_xlim()[1]]
        assert ticks and all(float(tick).is_integer() for tick in ticks), ticks


def test_the_reward_curve_of_a_ppo_run_has_a_critic_panel() -> None:
    rows = [{"round": 1, "step": step + 1, "reward/score": 0.1 * step, "reward/calls": 0.5,
             "critic/explained_var": -0.5 + 0.2 * step, "critic/vf_loss": 0.09 - 0.01 * step}
            for step in range(5)]
    figure = reward_curve_figure(rows)
    FigureCanvasAgg(figure).draw()
    _, _, critic = figure.axes
    assert [text.get_text() for text in critic.get_legend().get_texts()] == [
        "critic explained variance", "critic value loss"]
    explained, loss = (line.get_ydata() for line in critic.get_lines()[:2])
    assert list(explained) == pytest.approx([-0.5, -0.3, -0.1, 0.1, 0.3])
    assert list(loss) == pytest.approx([0.09, 0.08, 0.07, 0.06, 0.05])
    assert critic.get_xlabel() == "training step (all rounds)"
