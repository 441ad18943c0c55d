"""The native trainer on a tiny model: freeze policies, exact resume, PPO's critic, a warm start."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from tiny_world import build_tiny_world

from ftrl.config import load_run_config
from ftrl.train.algorithms import compute_advantages, outcome_rewards
from ftrl.train.native import NativeTrainer

ROOT = Path(__file__).resolve().parent.parent
FREEZE_OPTIONS = sorted(p.stem for p in (ROOT / "conf" / "freeze").glob("*.yaml"))


def _config(tmp: Path, **overrides) -> object:
    base = {
        "run_dir": str(tmp),
        "seed": 7,
        "model": {"max_new_tokens": 6, "tiny": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                                                "num_key_value_heads": 1, "intermediate_size": 64, "vocab_size": 512,
                                                "copy_pretrain_steps": 0}},
        "envs": {"procedural": {"num_train": 8, "num_test": 4, "id_pool_size": 8}},
        "train": {"prompts_per_step": 2, "n": 4, "mini_batch_prompts": 2, "micro_batch_size": 3, "lr": 5e-3,
                  "max_steps_per_round": 2, "temperature": 1.0, "entropy_coeff": 0.01, "kl_loss_coef": 0.01,
                  "save_every_steps": 1, "weight_decay": 0.1},
    }
    merged = OmegaConf.merge(OmegaConf.create(base), OmegaConf.create(overrides))
    return load_run_config(merged)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("world")
    return build_tiny_world(_config(tmp), tmp)


def _trainer(world: dict, tmp: Path, **overrides) -> NativeTrainer:
    cfg = _config(tmp, **overrides)
    return NativeTrainer(cfg, world["base"], world["envs"]["train"], tmp / "train", round_k=1)


@pytest.fixture(scope="module")
def world3(tmp_path_factory) -> dict:
    """A 3-layer model: the paper's layers 0-2 policies need at least three layers."""
    tmp = tmp_path_factory.mktemp("world3")
    overrides = {"model": {"tiny": {"num_hidden_layers": 3}}}
    return {**build_tiny_world(_config(tmp, **overrides), tmp), "overrides": overrides}


@pytest.mark.parametrize("policy", FREEZE_OPTIONS)
def test_freeze_policy_keeps_frozen_tensors_bit_identical(world: dict, world3: dict, tmp_path: Path,
                                                          policy: str) -> None:
    spec = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "freeze" / f"{policy}.yaml"))
    if "paper" in policy:
        trainer = _trainer(world3, tmp_path, freeze=spec, **world3["overrides"])
    else:
        trainer = _trainer(world, tmp_path, freeze=spec)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainable = {name for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable, policy
    trainer.run()
    after = dict(trainer.model.named_parameters())
    frozen_changed = [n for n in before if n not in trainable and not torch.equal(before[n], after[n])]
    assert frozen_changed == []
    assert any(not torch.equal(before[n], after[n]) for n in trainable)
    if policy == "paper_lower_mlp_only":  # 3 layers: the paper's layers 0-2 MLP, i.e. every MLP here
        assert trainable == {f"model.layers.{i}.mlp.{m}_proj.weight" for i in range(3) for m in ("gate", "up", "down")}
    if policy == "lower_mlp_only":  # 2 layers: layer 0's gate/up/down only
        assert trainable == {f"model.layers.0.mlp.{m}_proj.weight" for m in ("gate", "up", "down")}


def test_resume_after_a_kill_reaches_the_same_weights(world: dict, tmp_path: Path) -> None:
    overrides = {"train": {"max_steps_per_round": 4, "save_every_steps": 2}}
    straight = _trainer(world, tmp_path / "straight", **overrides)
    straight.run()

    killed = _trainer(world, tmp_path / "killed", **overrides)
    original_step = NativeTrainer.train_step
    calls = {"n": 0}

    def dies_in_step_four(self):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # after step 3 ran but before step 3's state was saved
        return original_step(self)

    NativeTrainer.train_step = dies_in_step_four
    try:
        with pytest.raises(KeyboardInterrupt):
            killed.run()
    finally:
        NativeTrainer.train_step = original_step
    assert len((tmp_path / "killed" / "train" / "history.jsonl").read_text().splitlines()) == 3
    resumed = _trainer(world, tmp_path / "killed", **overrides)
    history = resumed.run()
    assert [row["step"] for row in history] == [1, 2, 3, 4]
    for (name, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), name
    straight_rows = (tmp_path / "straight" / "train" / "history.jsonl").read_text().splitlines()
    import json

    assert [json.loads(r)["reward/score"] for r in straight_rows] == [r["reward/score"] for r in history]


def test_ppo_critic_learns_a_value_on_a_fixed_batch(world: dict, tmp_path: Path) -> None:
    trainer = _trainer(world, tmp_path, algorithm={"name": "ppo", "adv_estimator": "gae", "use_critic": True,
                                                   "critic": {"lr": 1e-2, "cliprange_value": 10.0}},
                       train={"prompts_per_step": 4})
    rollout = trainer.rollout(trainer.prompts_for_step(0), seed=1)
    # a batch with spread in its returns, so the value function has something to fit
    rollout.scores = torch.linspace(-0.5, 1.0, rollout.scores.numel())
    mask = rollout.batch.response_mask
    values = trainer._values_all(rollout.batch)
    _, returns = compute_advantages(trainer.cfg.algorithm, outcome_rewards(rollout.scores, mask), mask,
                                    rollout.group_index, values)
    losses = []
    for _ in range(25):
        metrics: dict[str, list[float]] = defaultdict(list)
        trainer._critic_step(rollout.batch, torch.arange(rollout.batch.size), returns, values, int(mask.sum()), metrics)
        losses.append(float(np.mean(metrics["critic/vf_loss"])))
    assert losses[-1] < 0.5 * losses[0], losses
    from ftrl.train.algorithms import explained_variance

    before, after = (explained_variance(v, returns, mask) for v in (values, trainer._values_all(rollout.batch)))
    assert after > before and after > 0.0, (before, after)  # the fitted critic explains part of the returns


def test_round_checkpoint_loads_with_from_pretrained(world: dict, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from ftrl.train.checkpoint import save_hf_checkpoint

    trainer = _trainer(world, tmp_path)
    trainer.run()
    out = save_hf_checkpoint(trainer.model, trainer.tokenizer, tmp_path / "checkpoint")
    loaded = AutoModelForCausalLM.from_pretrained(out)
    saved = load_file(str(out / "model.safetensors"))
    assert set(saved) and all(torch.equal(saved[n], p) for n, p in loaded.named_parameters() if n in saved)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".checkpoint")) == []  # no staging left
