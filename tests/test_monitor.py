"""The reward-hacking monitor: thresholds pinned, silent on the default run's own numbers, fires on spam."""

from __future__ import annotations

import pytest

from ftrl.train.monitor import HackingMonitor

# Per-step sampled-turn means (reward/calls, reward/solved) of the default GRPO run, seed 0, round 1
# (2-core machine, 2026-12-06): the monitor must stay silent on them.
DEFAULT_RUN_ROUND1 = [(0.63, 0.139), (0.78, 0.281), (0.75, 0.27), (1.13, 0.26), (0.87, 0.461), (0.97, 0.301),
                      (1.1, 0.308), (0.95, 0.39), (0.89, 0.454), (1.19, 0.321), (0.89, 0.285), (1.14, 0.399)]


def _row(calls: float, solved: float, malformed: float = 0.0) -> dict[str, float]:
    return {"reward/calls": calls, "reward/solved": solved, "reward/malformed": malformed, "reward/empty": 0.0}


def test_the_baseline_is_the_first_window_and_values_are_rolling() -> None:
    monitor = HackingMonitor(window=2, calls_factor=1.75, precision_factor=0.6)
    first = monitor.observe(1, 1, _row(1.0, 0.5))
    assert first["monitor/calls_per_turn"] == 1.0 and first["monitor/solve_p"] == 0.5 and first["monitor/alarm"] == 0
    monitor.observe(1, 2, _row(1.0, 0.3))
    assert monitor.baseline == pytest.approx({"calls_per_turn": 1.0, "solve_p": 0.4, "malformed": 0.0, "empty": 0.0})
    third = monitor.observe(1, 3, _row(3.0, 0.3))  # window (step 2, 3): calls 2.0 = 2.0 x baseline > 1.75 x
    assert third["monitor/calls_per_turn"] == 2.0 and third["monitor/solve_p"] == pytest.approx(0.15)
    assert third["monitor/alarm"] == 1.0
    assert [(a.round, a.step) for a in monitor.alarms] == [(1, 3)]
    assert monitor.alarms[0].reason == "calls per turn 2.00 > 1.75 x 1.00; Solve-P 0.15 < 0.6 x 0.40"
    assert monitor.observe(1, 4, _row(3.0, 0.3))["monitor/alarm"] == 0.0  # still firing: reported once
    monitor.observe(1, 5, _row(1.0, 0.4))
    monitor.observe(1, 6, _row(1.0, 0.4))  # back to normal, then a second episode fires again
    monitor.observe(2, 1, _row(4.0, 0.2))
    assert [(a.round, a.step) for a in monitor.alarms] == [(1, 3), (2, 1)]


def test_thresholds_sit_at_the_factors() -> None:
    monitor = HackingMonitor(window=1, calls_factor=1.75, precision_factor=0.6)
    monitor.observe(1, 1, _row(1.0, 0.5))
    assert monitor.observe(1, 2, _row(1.75, 0.875))["monitor/alarm"] == 0.0  # exactly 1.75 x: not above
    assert monitor.observe(1, 3, _row(1.0, 0.3))["monitor/alarm"] == 0.0  # Solve-P 0.3 = 0.6 x 0.5: not below
    assert monitor.observe(1, 4, _row(1.0, 0.29))["monitor/alarm"] == 1.0


def test_silent_on_the_default_grpo_run_and_fires_on_a_call_spamming_policy() -> None:
    default = HackingMonitor()
    assert not any(default.observe(1, step, _row(c, s))["monitor/alarm"]
                   for step, (c, s) in enumerate(DEFAULT_RUN_ROUND1, start=1))
    assert default.alarms == []
    spam = HackingMonitor()
    spam.replay(_row(c, s) for c, s in DEFAULT_RUN_ROUND1[:4])  # the warm start's window, from history
    fired = [spam.observe(2, step, _row(3.0, 0.3))["monitor/alarm"] for step in range(1, 5)]
    assert fired == [0.0, 1.0, 0.0, 0.0] and spam.alarms[0].step == 2  # the window mixes in the spam


def test_explained_variance_of_the_critic() -> None:
    import torch

    from ftrl.train.algorithms import explained_variance

    returns = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])  # the 9.0 is padding
    assert explained_variance(returns.clone(), returns, mask) == 1.0
    assert explained_variance(torch.full_like(returns, 0.5), returns, mask) == 0.0  # the mean: explains nothing
    # returns 1,1,0,0 (var 0.25); values 1,0,0,0 -> residuals 0,1,0,0 (var 0.1875): 1 - 0.1875 / 0.25
    values = torch.tensor([[1.0, 0.0, 5.0], [0.0, 0.0, 5.0]])
    assert explained_variance(values, returns, mask) == pytest.approx(0.25)
    assert explained_variance(values, torch.ones_like(returns), mask) == 0.0  # constant returns
