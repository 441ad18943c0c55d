"""Benchmark stage ``train``: one native GRPO step against TRL's ``GRPOTrainer``, and the warm start's SFT.

GRPO: the same model, the same prompts (the run's ``train.prompts_per_step`` snapshots, rendered by
the chat template), ``train.n`` samples each, ``max_new_tokens`` completions, KL to the starting
policy, the project's reward; one step = sampling, scoring, reference log-probs and one update. TRL
runs on this machine's CPU through ``transformers.generate``. The native step is ``NativeTrainer``'s
(packed decoding and padding-free log-probabilities). Step times are medians after a warm-up step.

SFT: the warm start's loss (gold turns, target tokens only) on the same batches, padding-free
(``ftrl.train.batch.batch_logprobs``) against the HF forward on the padded batch.

    python -m ftrl.bench train --quick
"""

from __future__ import annotations

import logging
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ftrl.bench.report import Measure
from ftrl.bench.world import BenchContext, World, sft_pairs

log = logging.getLogger(__name__)

STEPS = {"quick": 1, "full": 3}  # timed GRPO steps after one warm-up step
SFT_STEPS = {"quick": 6, "full": 20}


def native_steps(world: World, steps: int, out: Path) -> dict[str, Any]:
    from ftrl.train.native import NativeTrainer

    trainer = NativeTrainer(world.cfg, world.model_dir, world.train, out, round_k=1)
    times, lengths = [], []
    for index in range(steps + 1):
        started = time.perf_counter()
        metrics = trainer.train_step()
        if index:
            times.append(time.perf_counter() - started)
            lengths.append(metrics["response/length_mean"])
    return {"step_s": statistics.median(times), "times": times, "completion_length": statistics.mean(lengths)}


def trl_steps(world: World, steps: int, out: Path) -> dict[str, Any]:
    """TRL ``GRPOTrainer`` on the same model, prompts and settings; the median step time."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from ftrl.llm.engines.base import ChatRequest
    from ftrl.llm.engines.hf import HFEngine
    from ftrl.llm.models import load_model_and_tokenizer
    from ftrl.reward import score_response
    from ftrl.types import Sample

    cfg, train = world.cfg, world.cfg.train
    model, tokenizer = load_model_and_tokenizer(str(world.model_dir))
    render = HFEngine(model, tokenizer, enable_thinking=cfg.mode.enable_thinking).render
    records = world.train[: train.prompts_per_step * (steps + 1)]
    prompts = [render(ChatRequest(Sample.from_record(r).messages, Sample.from_record(r).tools)) for r in records]

    def reward(prompts: list, completions: list, index: list, **_: Any) -> list[float]:
        return [score_response(text, records[i], variant=cfg.reward.name, compat=cfg.reward.compat,
                               timeout=cfg.reward.tool_timeout_s, parser=cfg.model.parser).score
                for text, i in zip(completions, index)]

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.started = 0.0

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.started = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.times.append(time.perf_counter() - self.started)

    timer = Timer()
    args = GRPOConfig(
        output_dir=str(out), per_device_train_batch_size=train.prompts_per_step * train.n,
        num_generations=train.n, gradient_accumulation_steps=1, max_completion_length=cfg.max_new_tokens,
        temperature=train.temperature, top_p=train.top_p, top_k=0,
        beta=train.kl_loss_coef if train.use_kl_loss else 0.0, learning_rate=train.lr,
        epsilon=train.clip_ratio_low, epsilon_high=train.clip_ratio_high, loss_type="grpo",
        max_grad_norm=train.grad_clip, weight_decay=train.weight_decay, lr_scheduler_type="constant",
        max_steps=steps + 1, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, bf16=False,
        seed=cfg.seed, shuffle_dataset=False, dataloader_num_workers=0, disable_tqdm=True, log_level="error")
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, processing_class=tokenizer,
                          train_dataset=Dataset.from_list([{"prompt": p, "index": i} for i, p in enumerate(prompts)]),
                          callbacks=[timer])
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # the step logs stay in trainer.state.log_history
    threads = torch.get_num_threads()
    trainer.train()
    torch.set_num_threads(threads)  # in case the trainer changed it
    lengths = [row["completions/mean_length"] for row in trainer.state.log_history[1:]
               if "completions/mean_length" in row]
    return {"step_s": statistics.median(timer.times[1:]), "times": timer.times[1:],
            "completion_length": statistics.mean(lengths) if lengths else None}


def _sft_run(world: World, pairs: list, steps: int, packed: bool) -> tuple[float, int, float]:
    """(seconds, tokens, first loss) of ``steps`` warm-start steps on the same batches."""
    from ftrl.llm.models import load_model_and_tokenizer
    from ftrl.train.batch import make_token_batch, response_logprobs
    from ftrl.train.native import build_optimizer
    from ftrl.train.warmup import sft_loss

    model, tokenizer = load_model_and_tokenizer(str(world.model_dir))
    optimizer = build_optimizer(list(model.parameters()), world.cfg.warmup.lr, 0.0)
    rng = random.Random(0)
    batches = [[pairs[rng.randrange(len(pairs))] for _ in range(world.cfg.warmup.batch_size)] for _ in range(steps)]
    model.train()
    tokens, first, started = 0, None, time.perf_counter()
    for batch in batches:
        if packed:
            loss = sft_loss(model, batch, tokenizer.pad_token_id, torch.device("cpu"))
        else:
            token_batch = make_token_batch([p for p, _ in batch], [t for _, t in batch], tokenizer.pad_token_id)
            log_probs, _ = response_logprobs(model, token_batch)
            mask = token_batch.response_mask[:, :log_probs.shape[1]]
            loss = -(log_probs * mask).sum() / mask.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        tokens += sum(len(p) + len(t) for p, t in batch)
        first = loss.item() if first is None else first
    return time.perf_counter() - started, tokens, first


def run(ctx: BenchContext) -> list[Measure]:
    world = ctx.world()
    mode = "quick" if world.quick else "full"
    with tempfile.TemporaryDirectory(prefix="ftrl-bench-train-") as tmp:
        ours = native_steps(world, STEPS[mode], Path(tmp) / "native")
        trl = trl_steps(world, STEPS[mode], Path(tmp) / "trl")
    train = world.cfg.train
    grpo = Measure("train", "train",
                   f"one GRPO step: {train.prompts_per_step} prompts x {train.n} samples, "
                   f"<= {world.cfg.max_new_tokens} new tokens", "s/step", ours["step_s"], trl["step_s"],
                   "TRL GRPOTrainer (transformers generate)", higher_is_better=False,
                   details={"native": ours, "trl": trl})
    from ftrl.llm.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(str(world.model_dir))
    pairs = sft_pairs(world.cfg, model, tokenizer, world.train[:200])
    steps = SFT_STEPS[mode]
    packed = _sft_run(world, pairs, steps, packed=True)
    padded = _sft_run(world, pairs, steps, packed=False)
    sft = Measure("train.sft", "train", f"warm-start SFT, batch {world.cfg.warmup.batch_size}, {steps} steps",
                  "tokens/s", packed[1] / packed[0], padded[1] / padded[0], "HF forward on the padded batch",
                  checks={"same_loss": abs(packed[2] - padded[2]) <= 1e-4 * abs(padded[2])},
                  details={"first_loss_packed": packed[2], "first_loss_padded": padded[2]})
    return [grpo, sft]
