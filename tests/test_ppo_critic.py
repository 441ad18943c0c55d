"""PPO's critic at the tiny scale: the train config's critic settings, a zero value head, critic passes per step.

    python -m pytest tests/test_ppo_critic.py -q
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from tiny_world import build_tiny_world

from ftrl.config import ConfigError, critic_settings, load_run_config
from ftrl.train.native import NativeTrainer, value_head

PPO = {"name": "ppo", "adv_estimator": "gae", "use_critic": True}


def _config(tmp: Path, **overrides) -> object:
    base = {
        "run_dir": str(tmp),
        "seed": 3,
        "algorithm": PPO,
        "model": {"max_new_tokens": 6, "tiny": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                                                "num_key_value_heads": 1, "intermediate_size": 64, "vocab_size": 512,
                                                "copy_pretrain_steps": 0}},
        "envs": {"procedural": {"num_train": 8, "num_test": 4, "id_pool_size": 8}},
        "train": {"prompts_per_step": 2, "n": 4, "mini_batch_prompts": 2, "micro_batch_size": 8, "lr": 5e-3,
                  "max_steps_per_round": 3, "save_every_steps": 10},
    }
    return load_run_config(OmegaConf.merge(OmegaConf.create(base), OmegaConf.create(overrides)))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("critic_world")
    return build_tiny_world(_config(tmp), tmp)


def test_train_critic_keys_override_the_algorithms_and_null_falls_back(tmp_path: Path) -> None:
    paper = critic_settings(*_parts(_config(tmp_path, train={"critic_lr": None, "critic_epochs": 1,
                                                            "critic_head_init": "random"})))
    assert (paper.lr, paper.warmup_steps, paper.epochs, paper.head_init) == (1e-5, 0, 1, "random")
    tiny = critic_settings(*_parts(_config(tmp_path)))  # the dataclass defaults are train=tiny's
    assert (tiny.lr, tiny.warmup_steps, tiny.epochs, tiny.head_init) == (1e-3, 0, 4, "zero")
    warm = critic_settings(*_parts(_config(tmp_path, train={"critic_warmup_steps": 2})))
    assert warm.warmup_steps == 2


def _parts(cfg) -> tuple:
    return cfg.algorithm, cfg.train


@pytest.mark.parametrize("key,value,message", [
    ("critic_head_init", "ones", "train.critic_head_init"),
    ("critic_epochs", 0, "train.critic_epochs"),
    ("critic_lr", -1.0, "train.critic_lr"),
    ("critic_warmup_steps", -1, "train.critic_warmup_steps"),
])
def test_bad_critic_settings_name_their_key(tmp_path: Path, key: str, value, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _config(tmp_path, train={key: value}).validate()


def test_a_zero_head_predicts_zero_and_the_critic_trains_epochs_times_per_step(world: dict, tmp_path: Path) -> None:
    cfg = _config(tmp_path, train={"critic_lr": 1e-2, "critic_epochs": 3, "critic_head_init": "zero",
                                   "critic_warmup_steps": 1, "max_steps_per_round": 2})
    trainer = NativeTrainer(cfg, world["base"], world["envs"]["train"], tmp_path / "train", round_k=1)
    assert all(float(p.detach().abs().sum()) == 0.0 for p in value_head(trainer.critic).parameters())
    assert trainer.critic_optimizer.param_groups[0]["lr"] == 1e-2
    rollout = trainer.rollout(trainer.prompts_for_step(0), seed=1)
    assert float(trainer._values_all(rollout.batch).abs().sum()) == 0.0
    policy_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    steps = 0
    original = trainer._critic_step

    def counting(*args, **kwargs):
        nonlocal steps
        steps += 1
        return original(*args, **kwargs)

    trainer._critic_step = counting
    metrics = trainer.update(rollout)  # step 0 < critic_warmup_steps: the critic learns, the policy waits
    assert steps == 3 and len(metrics) > 0
    assert all(torch.equal(policy_before[n], p) for n, p in trainer.model.named_parameters())
    assert any(float(p.detach().abs().sum()) > 0.0 for p in value_head(trainer.critic).parameters())
    trainer.step = 1
    trainer.update(rollout)  # past the warm-up: the policy moves too
    assert steps == 6
    assert any(not torch.equal(policy_before[n], p) for n, p in trainer.model.named_parameters())


def test_the_next_round_continues_from_the_saved_critic(world: dict, tmp_path: Path) -> None:
    """train.critic_carry_over: round 1's trained critic (head included) is saved and is round 2's start."""
    from ftrl.train.native import critic_dir, save_critic

    cfg = _config(tmp_path, train={"critic_lr": 1e-2, "critic_head_init": "zero", "max_steps_per_round": 1})
    assert critic_settings(cfg.algorithm, cfg.train).carry_over
    first = NativeTrainer(cfg, world["base"], world["envs"]["train"], tmp_path / "r1", round_k=1)
    first.update(first.rollout(first.prompts_for_step(0), seed=1))  # the rollout the test above trains on
    trained = {name: p.detach().clone() for name, p in first.critic.named_parameters()}
    assert any(float(p.abs().sum()) > 0.0 for p in value_head(first.critic).parameters())
    saved = save_critic(first.critic, critic_dir(tmp_path / "r1"))
    second = NativeTrainer(cfg, world["base"], world["envs"]["train"], tmp_path / "r2", round_k=2, critic_from=saved)
    assert {name: p.detach() for name, p in second.critic.named_parameters()}.keys() == trained.keys()
    assert all(torch.equal(trained[name], p.detach()) for name, p in second.critic.named_parameters())
    rollout = second.rollout(second.prompts_for_step(0), seed=1)
    assert float(second._values_all(rollout.batch).abs().sum()) > 0.0  # not a zero head: it learned in round 1
    fresh = NativeTrainer(cfg, world["base"], world["envs"]["train"], tmp_path / "r2b", round_k=2)
    assert all(float(p.detach().abs().sum()) == 0.0 for p in value_head(fresh.critic).parameters())


def test_a_ppo_run_hands_its_critic_to_the_next_round(tmp_path: Path) -> None:
    """The pipeline: round 1 saves its critic beside its history, round 2 starts from it (no zero head at step 1)."""
    import json

    from hydra import compose, initialize_config_dir

    import ftrl.run  # noqa: F401  (registers the ftrl_dirname resolver)
    from ftrl.pipeline import run_pipeline

    conf = Path(__file__).resolve().parent.parent / "conf"
    overrides = ["+debug=smoke", "algorithm=ppo", "model.warm_start=false", "stages=[build_envs,collect,train]",
                 "train.max_steps_per_round=1", "collect.max_envs=4", f"run_dir={tmp_path}"]
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = load_run_config(compose(config_name="config", overrides=overrides))
    run_pipeline(cfg)
    assert (tmp_path / "rounds" / "r1" / "train" / "critic" / "model.safetensors").is_file()
    rows = [json.loads(line) for k in (1, 2)
            for line in (tmp_path / "rounds" / f"r{k}" / "train" / "history.jsonl").read_text().splitlines()]
    assert rows[0]["critic/values_mean"] == 0.0  # round 1: the policy's backbone with a zero head
    assert rows[1]["critic/values_mean"] != 0.0  # round 2: round 1's trained critic
