"""Native backend: step-level FTRL training on one process (CPU or one GPU).

Each snapshot of round k is one prompt (its messages and its own tools through the chat template);
the policy samples ``train.n`` next turns; each turn is scored by the registered reward against that
snapshot's ``codes``/``unsolved_set`` (the scalar sits on the last response token); advantages,
the clipped policy loss, the KL loss and entropy come from ``verl.trainer.ppo.core_algos`` (see
``ftrl.train.algorithms``). PPO adds a value model trained with verl's clipped value loss.

Every ``train.save_every_steps`` the trainable weights, optimizer, scheduler and RNG are saved, so a
killed run resumes at the last saved step and reaches the same final checkpoint as an uninterrupted
run (sampling is seeded per step). The round ends with an HF safetensors checkpoint.

    python -m ftrl.run stages=[build_envs,collect,train] +debug=smoke
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ftrl.artifacts import HISTORY_JSONL, TRAINER_STATE_PT
from ftrl.config import RunConfig, critic_settings
from ftrl.progress import progress
from ftrl.run_state import RunContext
from ftrl.train.algorithms import (
    actor_loss,
    compute_advantages,
    critic_loss,
    explained_variance,
    outcome_rewards,
    verl_actor_config,
)
from ftrl.train.batch import TokenBatch, batch_logprobs, make_token_batch, micro_batches, pad_to, value_predictions
from ftrl.train.monitor import HackingMonitor

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ helpers
def build_optimizer(params: Sequence[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999), eps=1e-8)


def build_scheduler(optimizer: torch.optim.Optimizer, name: str, warmup_steps: int, total_steps: int) -> Any:
    """constant / cosine / linear decay after ``warmup_steps`` of linear warm-up (verl's schedules)."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if name == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(max(progress, 0.0), 1.0)
        if name == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def step_seed(seed: int, round_k: int, step: int) -> int:
    """Sampling seed of one training step: resuming at any step replays the same rollouts."""
    return (seed * 1_000_003 + round_k * 10_007 + step) % (2**31 - 1)


def group_zero_variance(scores: torch.Tensor, n: int) -> float:
    """Fraction of prompt groups whose n samples all scored the same (they give no GRPO signal)."""
    groups = scores.view(-1, n)
    return float((groups.max(dim=1).values == groups.min(dim=1).values).float().mean())


@dataclass
class RolloutResult:
    batch: TokenBatch
    scores: torch.Tensor
    group_index: np.ndarray
    metrics: dict[str, float] = field(default_factory=dict)
    texts: list[str] = field(default_factory=list)


class NoCallWatch:
    """The "no sampled turn made a tool call" warning, once per round instead of once per step.

    A policy that stops calling tools gets no reward signal, worth a warning; but a small model (the
    ``+debug=smoke`` one) makes no call at any step, and a warning per step buries the log. The first
    such step of a round warns (saying it is said once), :meth:`finish` logs how many steps had none.
    """

    def __init__(self, round_k: int) -> None:
        self.round_k = round_k
        self.steps = 0
        self.without_calls = 0

    def observe(self, step: int, metrics: Mapping[str, float]) -> None:
        self.steps += 1
        if metrics.get("reward/calls", 0.0) != 0.0:
            return
        self.without_calls += 1
        if self.without_calls == 1:
            log.warning("round %d step %d: no sampled turn made a tool call (policy collapsing to plain answers?); "
                        "warned once per round, the count of such steps follows at the round's end",
                        self.round_k, step)

    def finish(self) -> None:
        if self.without_calls:
            log.info("round %d: %d of %d steps had no sampled tool call", self.round_k, self.without_calls,
                     self.steps)


# ------------------------------------------------------------------------------------ trainer
class NativeTrainer:
    """One round of step-level RL on a list of snapshot records."""

    def __init__(self, cfg: RunConfig, policy: str | Path, snapshots: Sequence[Mapping[str, Any]],
                 out_dir: Path, round_k: int = 1, tracker: Any = None, step_offset: int = 0,
                 monitor_history: Sequence[Mapping[str, Any]] = (), critic_from: str | Path | None = None) -> None:
        """``critic_from``: a saved critic to start PPO's value model from (the previous round's), else the policy."""
        from ftrl.llm.engines.hf import HFEngine
        from ftrl.llm.models import load_model_and_tokenizer, resolve_device
        from ftrl.train.freeze import apply_freeze_policy, apply_lora

        self.cfg = cfg
        self.round_k = round_k
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.tracker = tracker
        self.step_offset = step_offset
        self.device = resolve_device(cfg.resources.device)
        train = cfg.train
        torch.manual_seed(step_seed(cfg.seed, round_k, -1))

        self.model, self.tokenizer = load_model_and_tokenizer(str(policy), dtype=cfg.model.dtype,
                                                              device=str(self.device),
                                                              trust_remote_code=cfg.model.trust_remote_code)
        if cfg.peft.name == "lora":
            self.model, report = apply_lora(self.model, cfg.peft, cfg.freeze)
        else:
            report = apply_freeze_policy(self.model, cfg.freeze)
        self.freeze_report = report
        log.info(report.describe())
        if train.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]

        self._build_reference_and_critic(str(policy), critic_from)
        # Packed decoding: each prompt's n samples share its prefill; no turns follow, so no prefix cache.
        self.engine = HFEngine(self.model, self.tokenizer, enable_thinking=cfg.mode.enable_thinking,
                               batch_size=train.rollout_batch_size, device=self.device, decoder="packed",
                               prefix_cache_mb=0)
        self.snapshots = self._fit_prompts(snapshots)
        self.steps_per_epoch = math.ceil(len(self.snapshots) / train.prompts_per_step) if self.snapshots else 0
        self.total_steps = self.steps_per_epoch * train.epochs_per_round
        if train.max_steps_per_round is not None:
            self.total_steps = min(self.total_steps, train.max_steps_per_round)
        self.optimizer = build_optimizer(self.trainable, train.lr, train.weight_decay)
        self.scheduler = build_scheduler(self.optimizer, train.lr_scheduler, train.lr_warmup_steps,
                                         max(1, self.total_steps))
        self.actor_config = verl_actor_config(train, train.n, train.mini_batch_prompts * train.n)
        self.state_path = self.out_dir / TRAINER_STATE_PT
        self.history_path = self.out_dir / HISTORY_JSONL
        self.step = 0
        self.no_calls = NoCallWatch(round_k)
        self.monitor = HackingMonitor(train.monitor_window, train.monitor_calls_factor, train.monitor_precision_factor)
        self.monitor.replay(monitor_history)

    def _build_reference_and_critic(self, policy: str, critic_from: str | Path | None = None) -> None:
        """The KL reference (the round's starting policy, as in the paper's per-round verl runs) and PPO's critic."""
        from ftrl.llm.models import load_model_and_tokenizer

        cfg = self.cfg
        self.ref_model = None
        if cfg.train.use_kl_loss and cfg.train.kl_loss_coef > 0:
            self.ref_model, _ = load_model_and_tokenizer(policy, dtype=cfg.model.dtype, device=str(self.device),
                                                         trust_remote_code=cfg.model.trust_remote_code)
            self.ref_model.eval().requires_grad_(False)
        self.critic = None
        self.critic_optimizer = None
        self.critic_settings = critic_settings(cfg.algorithm, cfg.train)
        if cfg.algorithm.use_critic:
            self.critic = build_critic(policy, cfg, self.device, critic_from)
            self.critic_optimizer = build_optimizer([p for p in self.critic.parameters() if p.requires_grad],
                                                    self.critic_settings.lr, cfg.train.weight_decay)

    # ---------------------------------------------------------------- data
    def _fit_prompts(self, snapshots: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
        """Drop snapshots whose rendered prompt exceeds mode.max_prompt_tokens (verl filters the same)."""
        from ftrl.llm.engines.base import ChatRequest
        from ftrl.types import Sample

        kept, dropped = [], 0
        limit = self.cfg.mode.max_prompt_tokens
        for record in snapshots:
            sample = Sample.from_record(record)
            text = self.engine.render(ChatRequest(messages=sample.messages, tools=sample.tools))
            if len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) <= limit:
                kept.append(record)
            else:
                dropped += 1
        if dropped:
            log.warning("train: dropped %d of %d snapshots longer than mode.max_prompt_tokens=%d", dropped,
                        len(snapshots), limit)
        return kept

    def prompts_for_step(self, step: int) -> list[Mapping[str, Any]]:
        """Epoch-wise seeded permutation; step s takes the next prompts_per_step snapshots."""
        per_step = self.cfg.train.prompts_per_step
        epoch, position = divmod(step, self.steps_per_epoch)
        order = np.random.default_rng(step_seed(self.cfg.seed, self.round_k, 10_000 + epoch)).permutation(
            len(self.snapshots))
        chosen = order[position * per_step:(position + 1) * per_step]
        return [self.snapshots[int(i)] for i in chosen]

    # ---------------------------------------------------------------- rollout + reward
    def rollout(self, prompts: Sequence[Mapping[str, Any]], seed: int) -> RolloutResult:
        from ftrl.llm.engines.base import ChatRequest, SamplingParams
        from ftrl.reward import score_response
        from ftrl.types import Sample

        cfg, train = self.cfg, self.cfg.train
        requests = [ChatRequest(messages=Sample.from_record(r).messages, tools=Sample.from_record(r).tools)
                    for r in prompts]
        params = SamplingParams(temperature=train.temperature, top_p=train.top_p,
                                max_new_tokens=cfg.max_new_tokens, n=train.n, seed=seed)
        self.model.eval()
        started = time.time()
        generations = self.engine.generate(requests, params)
        gen_seconds = time.time() - started

        started = time.time()
        prompt_ids, response_ids, texts, scores, parts = [], [], [], [], defaultdict(list)
        group_index = []
        for prompt_no, (record, outputs) in enumerate(zip(prompts, generations)):
            for generation in outputs:
                prompt_ids.append(generation.prompt_token_ids)
                response_ids.append(generation.token_ids)
                # The reward sees the decoded response with special tokens, as verl's reward manager does.
                text = self.tokenizer.decode(generation.token_ids, skip_special_tokens=False)
                texts.append(text)
                result = score_response(text, record, variant=cfg.reward.name, compat=cfg.reward.compat,
                                        timeout=cfg.reward.tool_timeout_s, parser=cfg.model.parser)
                scores.append(result.score)
                for key, value in result.as_metrics().items():
                    parts[key].append(value)
                group_index.append(prompt_no)
        batch = make_token_batch(prompt_ids, response_ids, self.tokenizer.pad_token_id)
        score_tensor = torch.tensor(scores, dtype=torch.float32)
        lengths = batch.response_mask.sum(dim=-1)
        generated = float(lengths.sum())
        eos_ids = {self.tokenizer.eos_token_id}
        truncated = [1.0 if (not ids or ids[-1] not in eos_ids) else 0.0 for ids in response_ids]
        metrics = {key: float(np.mean(values)) for key, values in parts.items()}
        metrics.update({
            "reward/score_std": float(score_tensor.std()) if len(scores) > 1 else 0.0,
            "reward/zero_variance_groups": group_zero_variance(score_tensor, train.n),
            "response/length_mean": float(lengths.mean()),
            "response/length_max": float(lengths.max()),
            "response/truncated": float(np.mean(truncated)),
            "rollout/tool_calls_per_turn": metrics.get("reward/calls", 0.0),
            "perf/gen_tokens_per_s": generated / max(gen_seconds, 1e-9),
            "perf/gen_s": gen_seconds,
            "perf/reward_s": time.time() - started,
        })
        return RolloutResult(batch=batch, scores=score_tensor, group_index=np.array(group_index),
                             metrics=metrics, texts=texts)

    # ---------------------------------------------------------------- log-probs and values
    @torch.no_grad()
    def _forward_all(self, model: torch.nn.Module, batch: TokenBatch) -> torch.Tensor:
        model.eval()
        length = batch.response_mask.shape[1]
        chunks = []
        for rows in micro_batches(batch.size, self.cfg.train.micro_batch_size):
            log_probs, _ = batch_logprobs(model, batch.select(rows).to(self.device))
            chunks.append(pad_to(log_probs.cpu(), length))
        return torch.cat(chunks)

    @torch.no_grad()
    def _values_all(self, batch: TokenBatch) -> torch.Tensor:
        self.critic.eval()
        length = batch.response_mask.shape[1]
        chunks = []
        for rows in micro_batches(batch.size, self.cfg.train.micro_batch_size):
            chunks.append(pad_to(value_predictions(self.critic, batch.select(rows).to(self.device)).cpu(), length))
        return torch.cat(chunks) * batch.response_mask

    # ---------------------------------------------------------------- update
    def update(self, rollout: RolloutResult) -> dict[str, float]:
        cfg, train = self.cfg, self.cfg.train
        batch = rollout.batch
        mask = batch.response_mask
        token_rewards = outcome_rewards(rollout.scores, mask)
        mini_size = max(1, train.mini_batch_prompts * train.n)
        # One update over one mini-batch is exactly on-policy: the "old" log-probs equal the current
        # ones (ratio 1), so they are taken (detached) from the training forward instead of an extra pass.
        on_policy = train.ppo_epochs == 1 and mini_size >= batch.size
        old_log_prob = None if on_policy else self._forward_all(self.model, batch)
        ref_log_prob = self._forward_all(self.ref_model, batch) if self.ref_model is not None else None
        values = self._values_all(batch) if self.critic is not None else None
        advantages, returns = compute_advantages(cfg.algorithm, token_rewards, mask, rollout.group_index, values)

        metrics: dict[str, list[float]] = defaultdict(list)
        update_actor = self.critic is None or self.step >= self.critic_settings.warmup_steps
        self.model.train()
        for _ in range(train.ppo_epochs):
            for mini in micro_batches(batch.size, mini_size):
                mini_tokens = int(mask[mini].sum())
                for _ in range(self.critic_settings.epochs if self.critic is not None else 0):
                    self._critic_step(batch, mini, returns, values, mini_tokens, metrics)
                if not update_actor:
                    continue
                self.optimizer.zero_grad(set_to_none=True)
                for rows in micro_batches(len(mini), train.micro_batch_size):
                    rows = mini[rows]
                    micro = batch.select(rows).to(self.device)
                    log_prob, entropy = batch_logprobs(self.model, micro, with_entropy=True)
                    width = log_prob.shape[1]
                    old = log_prob.detach() if old_log_prob is None else old_log_prob[rows, :width].to(self.device)
                    terms = actor_loss(
                        self.actor_config, log_prob, old,
                        advantages[rows, :width].to(self.device), micro.response_mask[:, :width], entropy,
                        ref_log_prob[rows, :width].to(self.device) if ref_log_prob is not None else None,
                        global_batch_size=len(mini), batch_num_tokens=max(mini_tokens, 1))
                    terms.loss.backward()
                    for key, value in terms.metrics.items():
                        metrics[key].append(value)
                grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, train.grad_clip)
                metrics["actor/grad_norm"].append(float(grad_norm))
                if torch.isfinite(grad_norm):
                    self.optimizer.step()
                else:
                    log.warning("step %d: non-finite grad norm, update skipped", self.step)
        if update_actor:
            self.scheduler.step()
        result = {key: float(np.mean(values_)) for key, values_ in metrics.items()}
        result["actor/lr"] = self.optimizer.param_groups[0]["lr"]
        result["actor/advantage_abs_mean"] = float((advantages.abs() * mask).sum() / mask.sum().clamp(min=1))
        if values is not None:
            result["critic/values_mean"] = float((values * mask).sum() / mask.sum().clamp(min=1))
            result["critic/explained_var"] = explained_variance(values, returns, mask)
        return result

    def _critic_step(self, batch: TokenBatch, mini: torch.Tensor, returns: torch.Tensor, old_values: torch.Tensor,
                     mini_tokens: int, metrics: dict[str, list[float]]) -> None:
        train = self.cfg.train
        self.critic.train()
        self.critic_optimizer.zero_grad(set_to_none=True)
        for rows in micro_batches(len(mini), train.micro_batch_size):
            rows = mini[rows]
            micro = batch.select(rows).to(self.device)
            vpreds = value_predictions(self.critic, micro)
            width = vpreds.shape[1]
            terms = critic_loss(vpreds, returns[rows, :width].to(self.device), old_values[rows, :width].to(self.device),
                                micro.response_mask[:, :width], self.cfg.algorithm.critic.cliprange_value,
                                train.loss_agg_mode, global_batch_size=len(mini), batch_num_tokens=max(mini_tokens, 1))
            terms.loss.backward()
            for key, value in terms.metrics.items():
                metrics[key].append(value)
        critic_params = [p for p in self.critic.parameters() if p.requires_grad]
        metrics["critic/grad_norm"].append(float(torch.nn.utils.clip_grad_norm_(critic_params, train.grad_clip)))
        self.critic_optimizer.step()

    # ---------------------------------------------------------------- loop
    def _resume(self) -> None:
        from ftrl.train.checkpoint import load_trainer_state

        if not self.state_path.exists():
            self.history_path.unlink(missing_ok=True)
            return
        payload = load_trainer_state(self.state_path, model=self.model, optimizer=self.optimizer,
                                     scheduler=self.scheduler, critic=self.critic,
                                     critic_optimizer=self.critic_optimizer)
        self.step = int(payload["step"])
        if self.history_path.exists():
            rows = self.history_path.read_text(encoding="utf-8").splitlines()[: self.step]
            self.history_path.write_text("".join(r + "\n" for r in rows), encoding="utf-8")
        log.info("train round %d: resumed at step %d/%d from %s", self.round_k, self.step, self.total_steps,
                 self.state_path)

    def _save_state(self) -> None:
        from ftrl.train.checkpoint import save_trainer_state

        save_trainer_state(self.state_path, step=self.step, model=self.model, optimizer=self.optimizer,
                           scheduler=self.scheduler, critic=self.critic, critic_optimizer=self.critic_optimizer)

    def train_step(self) -> dict[str, float]:
        started = time.time()
        prompts = self.prompts_for_step(self.step)
        rollout = self.rollout(prompts, seed=step_seed(self.cfg.seed, self.round_k, self.step))
        self.no_calls.observe(self.step, rollout.metrics)
        metrics = dict(rollout.metrics)
        metrics.update(self.monitor.observe(self.round_k, self.step + 1, rollout.metrics))
        update_started = time.time()
        metrics.update(self.update(rollout))
        metrics["perf/update_s"] = time.time() - update_started
        elapsed = time.time() - started
        metrics["perf/step_s"] = elapsed
        metrics["perf/tokens_per_s"] = float(rollout.batch.attention_mask.sum()) / max(elapsed, 1e-9)
        self.step += 1
        return metrics

    def run(self) -> list[dict[str, float]]:
        self._resume()
        self.monitor.replay(row for row in read_history(self.history_path) if row.get("step", 0) <= self.step)
        if self.total_steps == 0:
            raise ValueError(f"round {self.round_k}: no snapshots to train on")
        bar = progress(total=self.total_steps, initial=self.step, desc=f"train r{self.round_k}", unit="step")
        while self.step < self.total_steps:
            metrics = self.train_step()
            row = {"round": self.round_k, "step": self.step, "global_step": self.step_offset + self.step, **metrics}
            with open(self.history_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(row) + "\n")
            if self.tracker is not None:
                self.tracker.log({k: v for k, v in row.items() if isinstance(v, float)}, step=row["global_step"])
            save_every = max(1, self.cfg.train.save_every_steps)
            if self.step % save_every == 0 or self.step == self.total_steps:
                self._save_state()
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward/score']:.3f}", kl=f"{metrics.get('actor/kl_loss', 0):.4f}")
        bar.close()
        self.no_calls.finish()
        return read_history(self.history_path)


def build_critic(policy: str, cfg: RunConfig, device: torch.device,
                 critic_from: str | Path | None = None) -> torch.nn.Module:
    """A value model: the policy's backbone with a scalar head (verl's critic shape), seeded head.

    ``critic_from``: a critic saved by :func:`save_critic` (backbone and head as trained), loaded as it is.
    """
    from ftrl.llm.models import load_value_model

    if critic_from is not None:
        return load_value_model(str(critic_from), dtype=cfg.model.dtype, device=str(device),
                                trust_remote_code=cfg.model.trust_remote_code)
    torch.manual_seed(cfg.seed)
    critic = load_value_model(policy, dtype=cfg.model.dtype, device=str(device),
                              trust_remote_code=cfg.model.trust_remote_code)
    if critic_settings(cfg.algorithm, cfg.train).head_init == "zero":
        head = value_head(critic)
        with torch.no_grad():
            for parameter in head.parameters():
                parameter.zero_()
    return critic


def save_critic(critic: torch.nn.Module, path: Path) -> Path:
    """Write the critic (config and safetensors weights, head included) to ``path``, complete or not at all."""
    from ftrl.artifacts import atomic_dir

    with atomic_dir(path, if_exists="replace") as staging:
        critic.save_pretrained(staging, safe_serialization=True)
    return path


def critic_dir(train_dir: Path) -> Path:
    """Where a round's trained critic is kept for the next round (``train.critic_carry_over``)."""
    return Path(train_dir) / "critic"


def value_head(critic: torch.nn.Module) -> torch.nn.Module:
    """The scalar head of a token-classification value model (``score`` in Qwen/Llama, ``classifier`` in others)."""
    for name in ("score", "classifier"):
        head = getattr(critic, name, None)
        if isinstance(head, torch.nn.Module):
            return head
    raise ValueError(f"{type(critic).__name__}: no value head named 'score' or 'classifier'")


def read_history(path: Path) -> list[dict[str, Any]]:
    if not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


# ------------------------------------------------------------------------------------ stage entry
def train_round(ctx: RunContext, k: int) -> dict[str, Any]:
    """``train`` stage for round k on the native backend: train and checkpoint."""
    from ftrl.envs.io import read_records
    from ftrl.train.checkpoint import save_hf_checkpoint

    rd = ctx.run_dir
    snapshots_path = rd.snapshots(k)
    if not snapshots_path.exists():
        raise FileNotFoundError(f"{snapshots_path} is missing: the collect stage of round {k} must run first")
    earlier = [row for j in range(1, k) for row in read_history(rd.train_history(j))]
    carry_over = ctx.cfg.algorithm.use_critic and critic_settings(ctx.cfg.algorithm, ctx.cfg.train).carry_over
    critic_from = None
    if carry_over and k > 1:
        critic_from = critic_dir(rd.train_dir(k - 1))
        if not (critic_from / "config.json").is_file():
            log.warning("train round %d: no critic of round %d at %s (train.critic_carry_over); the critic starts "
                        "from the round's policy", k, k - 1, critic_from)
            critic_from = None
    trainer = NativeTrainer(ctx.cfg, ctx.policy_for_round(k), read_records(snapshots_path), rd.train_dir(k),
                            round_k=k, tracker=ctx.tracker, step_offset=len(earlier), monitor_history=earlier,
                            critic_from=critic_from)
    history = trainer.run()
    if carry_over:
        save_critic(trainer.critic, critic_dir(rd.train_dir(k)))
    save_hf_checkpoint(trainer.model, trainer.tokenizer, rd.checkpoint_dir(f"round{k}"))
    trainer.state_path.unlink(missing_ok=True)  # the finished checkpoint supersedes the resume state
    first, last = history[0], history[-1]
    log.info("train round %d: %d steps, reward %.3f -> %.3f; %s", k, len(history),
             first["reward/score"], last["reward/score"], trainer.freeze_report.describe())
    return {"steps": len(history), "reward_first": first["reward/score"], "reward_last": last["reward/score"],
            "snapshots": len(trainer.snapshots),
            "monitor_alarms": [vars(alarm) for alarm in trainer.monitor.alarms if alarm.round == k]}
