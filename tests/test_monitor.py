"""The reward-hacking monitor: thresholds pinned, silent on the default run's own numbers, fires on spam."""

from __future__ import annotations

import pytest

from ftrl.train.monitor import HackingMonitor

# Per-step sampled-turn means (reward/calls, reward/solved) of the default GRPO run (`python -m ftrl.run`, seed 0,
# two threads, 24 steps a round; 2-core machine, 2026-12-06; held-out Solve-F1 27.7 -> 35.4): the monitor must
# stay silent on them, although round 2's first rolling Solve-P (0.15) is under 0.6 x the warm start's (0.34):
# precision alone is no alarm while calls per turn stay near the warm start's (1.0 there).
DEFAULT_RUN = [
    (1.453, 0.469), (0.773, 0.281), (0.859, 0.289), (1.055, 0.352), (0.688, 0.203), (0.492, 0.289), (1.016, 0.273), (0.836, 0.195),
    (0.984, 0.273), (0.586, 0.266), (1.117, 0.32), (0.883, 0.312), (0.547, 0.242), (0.688, 0.242), (0.922, 0.328), (0.75, 0.164),
    (1.047, 0.484), (0.883, 0.273), (0.883, 0.211), (1.148, 0.32), (0.852, 0.297), (1.0, 0.086), (0.945, 0.211), (1.062, 0.125),
    (0.961, 0.164), (0.781, 0.117), (1.07, 0.25), (0.734, 0.211), (0.859, 0.297), (0.656, 0.125), (0.609, 0.227), (1.227, 0.516),
    (1.094, 0.188), (1.367, 0.25), (1.688, 0.359), (1.273, 0.523), (0.75, 0.203), (1.133, 0.375), (1.289, 0.523), (1.391, 0.305),
    (1.375, 0.25), (1.422, 0.352), (1.141, 0.164), (1.438, 0.258), (1.227, 0.406), (1.086, 0.195), (0.961, 0.328), (1.477, 0.258),
    (1.664, 0.469), (1.141, 0.352), (1.164, 0.219), (0.531, 0.008), (0.641, 0.102), (1.016, 0.273), (0.555, 0.148), (1.094, 0.211),
    (0.984, 0.188), (1.281, 0.43), (1.031, 0.398), (0.93, 0.422), (0.617, 0.164), (1.031, 0.18), (0.508, 0.117), (0.742, 0.125),
    (0.633, 0.203), (0.422, 0.164), (1.062, 0.359), (0.977, 0.312), (0.766, 0.195), (0.586, 0.047), (0.867, 0.258), (0.898, 0.242),
]
STEPS_PER_ROUND = 24


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
    assert default.summarize(_row(c, s) for c, s in DEFAULT_RUN[21:25])["solve_p"] == pytest.approx(0.1477, abs=1e-4)
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
