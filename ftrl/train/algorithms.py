"""RL math through verl's ``core_algos``: advantages, policy loss, KL and entropy terms, value loss.

Both backends use these exact functions, so the native trainer computes what verl computes at scale.
This module only maps our config onto verl's typed configs and shapes the per-micro-batch loss.

    python -m pytest tests/test_algorithms.py -q
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ftrl.config import AlgorithmConfig, TrainConfig
from ftrl.registry import ADV_ESTIMATORS


def verl_actor_config(train: TrainConfig, n: int, mini_batch_sequences: int) -> Any:
    """verl's own ActorConfig (clip ratios, dual-clip, loss aggregation) for compute_policy_loss."""
    from verl.workers.config.actor import ActorConfig

    return ActorConfig(
        strategy="fsdp",
        ppo_mini_batch_size=max(1, mini_batch_sequences // max(n, 1)),
        ppo_micro_batch_size_per_gpu=train.micro_batch_size,
        clip_ratio=train.clip_ratio_low,
        clip_ratio_low=train.clip_ratio_low,
        clip_ratio_high=train.clip_ratio_high,
        clip_ratio_c=train.clip_ratio_c,
        loss_agg_mode=train.loss_agg_mode,
        entropy_coeff=train.entropy_coeff,
        use_kl_loss=train.use_kl_loss,
        kl_loss_coef=train.kl_loss_coef,
        kl_loss_type=train.kl_loss_type,
        ppo_epochs=train.ppo_epochs,
        rollout_n=n,
    )


def verl_algo_config(algorithm: AlgorithmConfig) -> Any:
    from verl.trainer.config.algorithm import AlgoConfig

    return AlgoConfig(gamma=algorithm.gamma, lam=algorithm.lam, adv_estimator=algorithm.adv_estimator,
                      norm_adv_by_std_in_grpo=algorithm.norm_adv_by_std_in_grpo)


def grpo_advantages(algorithm: AlgorithmConfig, token_level_rewards: torch.Tensor, response_mask: torch.Tensor,
                    group_index: np.ndarray, values: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO: each sample's reward minus its group's mean (divided by the group's std when configured)."""
    from verl.trainer.ppo import core_algos

    return core_algos.compute_grpo_outcome_advantage(
        token_level_rewards=token_level_rewards, response_mask=response_mask, index=group_index,
        norm_adv_by_std_in_grpo=algorithm.norm_adv_by_std_in_grpo)


def reinforce_pp_advantages(algorithm: AlgorithmConfig, token_level_rewards: torch.Tensor,
                            response_mask: torch.Tensor, group_index: np.ndarray,
                            values: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reinforce++: discounted returns whitened over the batch, no critic."""
    from verl.trainer.ppo import core_algos

    return core_algos.compute_reinforce_plus_plus_outcome_advantage(
        token_level_rewards=token_level_rewards, response_mask=response_mask, config=verl_algo_config(algorithm))


def gae_advantages(algorithm: AlgorithmConfig, token_level_rewards: torch.Tensor, response_mask: torch.Tensor,
                   group_index: np.ndarray, values: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's GAE over the critic's values."""
    from verl.trainer.ppo import core_algos

    if values is None:
        raise ValueError("algorithm.adv_estimator=gae needs critic values")
    return core_algos.compute_gae_advantage_return(
        token_level_rewards=token_level_rewards, values=values, response_mask=response_mask,
        gamma=algorithm.gamma, lam=algorithm.lam)


def compute_advantages(
    algorithm: AlgorithmConfig,
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    group_index: np.ndarray,
    values: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), each (batch, response_len), from ``algorithm.adv_estimator``.

    The estimator name is the one the verl backend passes as ``algorithm.adv_estimator`` (the same
    config key), so both backends train with the same estimator for every option and override.
    """
    estimate = ADV_ESTIMATORS.get(algorithm.adv_estimator)
    return estimate(algorithm, token_level_rewards, response_mask, group_index, values)


@dataclass
class LossTerms:
    loss: torch.Tensor
    metrics: dict[str, float]


def actor_loss(
    actor_config: Any,
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    entropy: torch.Tensor | None,
    ref_log_prob: torch.Tensor | None,
    global_batch_size: int,
    batch_num_tokens: int,
) -> LossTerms:
    """The actor objective of one micro-batch, scaled so micro-batch losses sum to the mini-batch loss.

    ``global_batch_size`` / ``batch_num_tokens`` are the mini-batch's sequence and token counts; verl's
    ``agg_loss`` divides by them (instead of the micro-batch's), which makes gradient accumulation
    exact for every loss-aggregation mode.
    """
    from verl.trainer.ppo import core_algos

    actor_config.global_batch_info.clear()
    actor_config.global_batch_info.update(
        {"dp_size": 1, "global_batch_size": global_batch_size, "batch_num_tokens": batch_num_tokens})
    agg_kwargs = dict(actor_config.global_batch_info)
    mode = actor_config.loss_agg_mode
    pg_loss, pg_metrics = core_algos.compute_policy_loss_vanilla(
        old_log_prob=old_log_prob, log_prob=log_prob, advantages=advantages, response_mask=response_mask,
        loss_agg_mode=mode, config=actor_config)
    loss = pg_loss
    metrics = {"actor/pg_loss": pg_loss.item(), **{k: float(v) for k, v in pg_metrics.items()}}
    if entropy is not None:
        entropy_term = core_algos.agg_loss(loss_mat=entropy, loss_mask=response_mask, loss_agg_mode=mode,
                                           **agg_kwargs)
        metrics["actor/entropy"] = entropy_term.item()
        if actor_config.entropy_coeff:
            loss = loss - actor_config.entropy_coeff * entropy_term
    if actor_config.use_kl_loss and ref_log_prob is not None:
        kl = core_algos.kl_penalty(logprob=log_prob, ref_logprob=ref_log_prob, kl_penalty=actor_config.kl_loss_type)
        kl_term = core_algos.agg_loss(loss_mat=kl, loss_mask=response_mask, loss_agg_mode=mode, **agg_kwargs)
        metrics["actor/kl_loss"] = kl_term.item()
        loss = loss + actor_config.kl_loss_coef * kl_term
    return LossTerms(loss=loss, metrics=metrics)


def critic_loss(
    vpreds: torch.Tensor,
    returns: torch.Tensor,
    old_values: torch.Tensor,
    response_mask: torch.Tensor,
    cliprange_value: float,
    loss_agg_mode: str,
    global_batch_size: int,
    batch_num_tokens: int,
) -> LossTerms:
    from verl.trainer.ppo import core_algos

    vf_loss, vf_clipfrac = core_algos.compute_value_loss(
        vpreds=vpreds, returns=returns, values=old_values, response_mask=response_mask,
        cliprange_value=cliprange_value, loss_agg_mode=loss_agg_mode, dp_size=1,
        batch_num_tokens=batch_num_tokens, global_batch_size=global_batch_size)
    return LossTerms(loss=vf_loss, metrics={"critic/vf_loss": vf_loss.item(),
                                            "critic/vf_clipfrac": float(vf_clipfrac)})


def outcome_rewards(scores: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Token-level rewards: each sequence's scalar on its last response token (verl's convention)."""
    rewards = torch.zeros_like(response_mask, dtype=torch.float32)
    lengths = response_mask.sum(dim=-1).long()
    rows = torch.arange(rewards.shape[0])
    has_tokens = lengths > 0
    rewards[rows[has_tokens], lengths[has_tokens] - 1] = scores[has_tokens].float()
    return rewards


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns) over the response tokens (verl's ``critic/vf_explained_var``).

    1 is a perfect critic, 0 one no better than a constant, negative worse than that; 0.0 when the
    returns have no variance (nothing to explain).
    """
    mask = mask.to(values.dtype)
    count = mask.sum().clamp(min=1)

    def variance(x: torch.Tensor) -> torch.Tensor:
        mean = (x * mask).sum() / count
        return (((x - mean) ** 2) * mask).sum() / count

    var_returns = variance(returns)
    if float(var_returns) == 0.0:
        return 0.0
    return float(1.0 - variance(returns - values) / var_returns)
