"""Advantages and losses on hand-made batches, checked against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ftrl.config import AlgorithmConfig, TrainConfig
from ftrl.train.algorithms import actor_loss, compute_advantages, critic_loss, outcome_rewards, verl_actor_config
from ftrl.train.batch import make_token_batch, trim

torch.set_num_threads(1)

MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])


def test_outcome_reward_sits_on_last_response_token() -> None:
    rewards = outcome_rewards(torch.tensor([1.0, -0.5, 0.25, 0.0]), MASK)
    assert rewards.tolist() == [[0.0, 0.0, 1.0], [0.0, -0.5, 0.0], [0.25, 0.0, 0.0], [0.0, 0.0, 0.0]]


def test_grpo_advantage_is_group_zscore() -> None:
    scores = torch.tensor([1.0, 0.0, 0.5, 0.5])
    adv, returns = compute_advantages(AlgorithmConfig(name="grpo", adv_estimator="grpo"),
                                      outcome_rewards(scores, MASK), MASK, np.array([0, 0, 1, 1]))
    std = math.sqrt(0.5)  # unbiased std of (1, 0)
    expected = torch.tensor([0.5 / (std + 1e-6), -0.5 / (std + 1e-6), 0.0, 0.0])
    assert torch.allclose(adv, expected[:, None] * MASK, atol=1e-6)
    assert torch.equal(adv, returns)
    # Dr.GRPO variant: no division by the std.
    adv_unscaled, _ = compute_advantages(
        AlgorithmConfig(name="grpo", adv_estimator="grpo", norm_adv_by_std_in_grpo=False),
        outcome_rewards(scores, MASK), MASK, np.array([0, 0, 1, 1]))
    assert torch.allclose(adv_unscaled[:, 0], torch.tensor([0.5, -0.5, 0.0, 0.0]))


def test_reinforce_pp_whitens_returns_over_the_batch() -> None:
    scores = torch.tensor([1.0, 0.0, 0.5, 0.5])
    adv, returns = compute_advantages(AlgorithmConfig(name="reinforce_pp", adv_estimator="reinforce_plus_plus"),
                                      outcome_rewards(scores, MASK), MASK, np.array([0, 0, 1, 1]))
    # gamma = 1: every valid token's return is its sequence's score.
    assert torch.allclose(returns, scores[:, None] * MASK)
    valid = returns[MASK.bool()]  # 3x1.0, 2x0.0, 1x0.5, 3x0.5
    mean = valid.mean()
    var = ((valid - mean) ** 2).sum() / (valid.numel() - 1)  # verl's masked_var is unbiased
    expected = (returns - mean) / torch.sqrt(var + 1e-8) * MASK
    assert torch.allclose(adv, expected, atol=1e-5)
    assert abs(float(mean) - 5.0 / 9.0) < 1e-6


def test_gae_with_gamma_lambda_one_is_return_minus_value_then_whitened() -> None:
    scores = torch.tensor([1.0, 0.0])
    mask = MASK[:2]
    values = torch.tensor([[0.2, 0.4, 0.6], [0.1, 0.3, 0.0]])
    adv, returns = compute_advantages(AlgorithmConfig(name="ppo", adv_estimator="gae", use_critic=True),
                                      outcome_rewards(scores, mask), mask, np.array([0, 1]), values=values)
    raw = torch.tensor([[0.8, 0.6, 0.4], [-0.1, -0.3, 0.0]])  # sum of future rewards - value
    assert torch.allclose(returns, raw + values, atol=1e-6)
    valid = raw[mask.bool()]
    expected = (raw - valid.mean()) / torch.sqrt(valid.var() + 1e-8) * mask
    assert torch.allclose(adv * mask, expected, atol=1e-5)


def _actor_config(mode: str = "seq-mean-token-mean", **overrides) -> object:
    train = TrainConfig(loss_agg_mode=mode, entropy_coeff=0.0, use_kl_loss=False, **overrides)
    return verl_actor_config(train, n=2, mini_batch_sequences=4)


def test_clipped_and_dual_clipped_policy_loss_by_hand() -> None:
    # One token per sequence so every aggregation mode reduces to a plain mean.
    mask = torch.ones(4, 1)
    advantages = torch.tensor([[1.0], [-1.0], [-1.0], [1.0]])
    ratios = torch.tensor([[1.5], [0.5], [5.0], [1.0]])
    old = torch.zeros(4, 1)
    new = torch.log(ratios)
    terms = actor_loss(_actor_config(), new, old, advantages, mask, None, None, global_batch_size=4,
                       batch_num_tokens=4)
    # per token: clip 1.5 -> 1.2 => -1.2 ; adv<0, ratio 0.5 -> max(0.5, 0.8) = 0.8 ;
    # adv<0, ratio 5 -> max(5, 1.2) = 5, dual clip min(3, 5) = 3 ; ratio 1 -> -1
    expected = (-1.2 + 0.8 + 3.0 - 1.0) / 4
    assert abs(terms.loss.item() - expected) < 1e-6
    # the clipped term binds for rows 0 and 1; the dual clip binds for row 2 (a negative advantage)
    assert abs(terms.metrics["actor/pg_clipfrac"] - 0.5) < 1e-6
    assert abs(terms.metrics["actor/pg_clipfrac_lower"] - 0.25) < 1e-6


def test_kl_and_entropy_terms_enter_with_their_coefficients() -> None:
    mask = torch.tensor([[1.0, 1.0]])
    log_prob = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0]])
    entropy = torch.tensor([[0.3, 0.7]])
    config = verl_actor_config(TrainConfig(loss_agg_mode="token-mean", entropy_coeff=0.1, use_kl_loss=True,
                                           kl_loss_coef=0.5, kl_loss_type="low_var_kl"), n=1, mini_batch_sequences=1)
    terms = actor_loss(config, log_prob, log_prob.clone(), torch.zeros_like(mask), mask, entropy, ref,
                       global_batch_size=1, batch_num_tokens=2)
    # low_var_kl (k3): exp(ref - logp) - (ref - logp) - 1
    diffs = [-0.5, 1.0]
    kl = sum(math.exp(d) - d - 1 for d in diffs) / 2
    assert abs(terms.metrics["actor/kl_loss"] - kl) < 1e-6
    assert abs(terms.metrics["actor/entropy"] - 0.5) < 1e-6
    assert abs(terms.loss.item() - (0.0 - 0.1 * 0.5 + 0.5 * kl)) < 1e-6


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_micro_batch_losses_sum_to_the_mini_batch_loss(mode: str) -> None:
    generator = torch.Generator().manual_seed(0)
    log_prob = torch.randn(4, 3, generator=generator)
    old = log_prob + 0.1 * torch.randn(4, 3, generator=generator)
    adv = torch.randn(4, 3, generator=generator)
    config = _actor_config(mode)
    tokens = int(MASK.sum())
    whole = actor_loss(config, log_prob, old, adv, MASK, None, None, global_batch_size=4, batch_num_tokens=tokens)
    parts = sum(actor_loss(config, log_prob[rows], old[rows], adv[rows], MASK[rows], None, None,
                           global_batch_size=4, batch_num_tokens=tokens).loss
                for rows in (slice(0, 1), slice(1, 3), slice(3, 4)))
    assert torch.allclose(whole.loss, parts, atol=1e-6)


def test_value_loss_clips_around_old_values() -> None:
    mask = torch.ones(1, 2)
    terms = critic_loss(vpreds=torch.tensor([[1.0, 0.0]]), returns=torch.tensor([[0.0, 0.0]]),
                        old_values=torch.tensor([[0.0, 0.0]]), response_mask=mask, cliprange_value=0.5,
                        loss_agg_mode="token-mean", global_batch_size=1, batch_num_tokens=2)
    # token 0: unclipped (1-0)^2 = 1, clipped (0.5-0)^2 = 0.25, max = 1 ; token 1: 0 ; 0.5 * mean = 0.25
    assert abs(terms.loss.item() - 0.25) < 1e-6


def test_token_batch_layout_and_trim() -> None:
    batch = make_token_batch([[5, 6, 7], [8]], [[1, 2], [3, 4, 9]], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 1, 2, 0], [0, 0, 8, 3, 4, 9]]
    assert batch.response_mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 4], [0, 0, 0, 1, 2, 3]]
    short = trim(batch.select([1]))
    assert short.input_ids.tolist() == [[8, 3, 4, 9]] and short.prompt_length == 1


@pytest.mark.parametrize("mode,expected_grad", [("seq-mean-token-mean", 1 / 6), ("token-mean", 0.0)])
def test_a_batch_baseline_pushes_towards_long_answers_only_under_seq_mean_token_mean(
        mode: str, expected_grad: float) -> None:
    # One logit theta picks a 1-token answer (p = sigmoid(theta)) or a 3-token one; at theta = 0 a batch of one of
    # each is the exact expectation. Both score below the batch baseline (advantage -1, as Reinforce++ gives every
    # turn of a prompt it fails on). The expected gradient of a constant baseline must be 0: token-mean (each
    # answer's whole log-prob, one normaliser) gives 0, seq-mean-token-mean (each answer's log-prob / its length)
    # gives -A * (0.5 - 0.5 / 3) / 2 = 1/6 > 0, so a descent step lowers theta: towards the longer answer. This is
    # why conf/train_algorithm/tiny_reinforce_pp.yaml trains Reinforce++ with token-mean.
    theta = torch.zeros((), requires_grad=True)
    rest = torch.tensor([-0.1, -0.2])
    log_prob = torch.stack([torch.stack([torch.nn.functional.logsigmoid(theta), torch.tensor(0.0), torch.tensor(0.0)]),
                            torch.cat([torch.nn.functional.logsigmoid(-theta).reshape(1), rest])])
    mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    advantages = -mask
    terms = actor_loss(_actor_config(mode), log_prob, log_prob.detach(), advantages, mask, None, None,
                       global_batch_size=2, batch_num_tokens=int(mask.sum()))
    terms.loss.backward()
    assert theta.grad is not None
    assert abs(theta.grad.item() - expected_grad) < 1e-6
