"""The reward-hacking monitor: thresholds pinned, silent on the default run's own numbers, fires on spam."""

from __future__ import annotations

import pytest

from ftrl.train.monitor import HackingMonitor

# Per-step sampled-turn means (reward/calls, reward/solved) of the default GRPO run, seed 0, rounds 1-3
# (2-core machine, one thread, 2026-12-06; held-out Solve-F1 28.4 -> 34.2, Solve-P 29.1 -> 38.1): the monitor
# must stay silent on them, although round 3's rolling Solve-P (0.11 at step 5) is under 0.6 x the warm
# start's (0.25): later rounds train on deeper snapshots.
DEFAULT_RUN = [
    (0.953, 0.227), (1.359, 0.398), (0.844, 0.195), (1.234, 0.258), (1.203, 0.211), (1.07, 0.312), (0.938, 0.312),
    (1.102, 0.32), (0.859, 0.203), (0.977, 0.391), (1.031, 0.43), (1.281, 0.344),
    (1.25, 0.312), (1.5, 0.469), (1.273, 0.281), (1.094, 0.406), (1.367, 0.375), (1.32, 0.383), (1.422, 0.43),
    (1.336, 0.336), (1.305, 0.422), (2.016, 0.227), (1.906, 0.43), (1.109, 0.141),
    (1.484, 0.367), (1.43, 0.164), (1.0, 0.203), (1.289, 0.117), (1.555, 0.086), (1.648, 0.266), (1.172, 0.172),
    (1.508, 0.172), (1.43, 0.141), (1.648, 0.211), (1.875, 0.195), (1.703, 0.312),
]
STEPS_PER_ROUND = 12


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


def test_thresholds_sit_at_the_factors_and_both_must_be_crossed() -> None:
    monitor = HackingMonitor(window=1, calls_factor=1.75, precision_factor=0.6)
    monitor.observe(1, 1, _row(1.0, 0.5))
    assert monitor.observe(1, 2, _row(1.75, 0.3))["monitor/alarm"] == 0.0  # calls exactly 1.75 x: not above
    assert monitor.observe(1, 3, _row(2.0, 0.6))["monitor/alarm"] == 0.0  # Solve-P 0.3 = 0.6 x 0.5: not below
    assert monitor.observe(1, 4, _row(1.0, 0.1))["monitor/alarm"] == 0.0  # precision alone: no alarm
    assert monitor.observe(1, 5, _row(3.0, 1.5))["monitor/alarm"] == 0.0  # more calls alone (parallel calls): none
    assert monitor.observe(1, 6, _row(2.0, 0.58))["monitor/alarm"] == 1.0  # both: 2.0 > 1.75, 0.29 < 0.3
    assert monitor.alarms[-1].reason == "calls per turn 2.00 > 1.75 x 1.00; Solve-P 0.29 < 0.6 x 0.50"


def test_silent_on_the_default_grpo_run_and_fires_on_a_call_spamming_policy() -> None:
    default = HackingMonitor()
    fired = [default.observe(1 + index // STEPS_PER_ROUND, 1 + index % STEPS_PER_ROUND, _row(c, s))["monitor/alarm"]
             for index, (c, s) in enumerate(DEFAULT_RUN)]
    assert not any(fired) and default.alarms == []
    assert default.summarize(_row(c, s) for c, s in DEFAULT_RUN[25:29])["solve_p"] == pytest.approx(0.1081, abs=1e-4)
    spam = HackingMonitor()
    spam.replay(_row(c, s) for c, s in DEFAULT_RUN[:4])  # the warm start's window, from history
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
