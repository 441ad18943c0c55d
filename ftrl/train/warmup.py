"""Supervised warm start on gold trajectories, so a tiny random model can emit tool calls before RL.

The environment builders know each environment's gold chain (``gold_calls``). Each gold turn becomes
one step-level example, exactly the RL prompt format: the history so far (with real tool outputs
from the sandbox) through the chat template, and as target the turn the model should write — the
``<tool_call>`` blocks of that hop, or finally "The answer is <answer>.". Loss is cross-entropy on
target tokens only; every parameter trains (freeze policies apply to RL). Real models skip this
(``model.warm_start=false``).

    python -m ftrl.run stages=[build_envs,train] +debug=smoke train.rounds=1
"""

from __future__ import annotations

import copy
import json
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ftrl.llm.parsers import format_qwen_tool_calls
from ftrl.progress import progress
from ftrl.run_state import RunContext
from ftrl.types import Sample, make_tool_call

log = logging.getLogger(__name__)


@dataclass
class WarmupExample:
    messages: list[dict]
    tools: list[dict]
    target: str


def format_tool_calls(calls: Sequence[Mapping[str, Any]]) -> str:
    """The text of an assistant turn that makes ``calls`` (``{"name", "arguments"}``) in the Qwen/Hermes format."""
    return format_qwen_tool_calls([make_tool_call(c["name"], json.dumps(c["arguments"], ensure_ascii=False))
                                   for c in calls])


def final_answer_text(answer: str) -> str:
    return f"The answer is {answer}."


def gold_examples(records: Sequence[Mapping[str, Any]],
                  execute: Callable[[list[tuple[Any, list[dict]]]], list[list[str]]]) -> list[WarmupExample]:
    """Replay every record's gold chain through the tools; one example per assistant turn."""
    from ftrl.envs.executor import TurnContext

    states = []
    for index, record in enumerate(records):
        if "gold_calls" not in record:
            raise KeyError(f"train record {index} has no 'gold_calls': the warm start needs environments from a "
                           "builder that knows the gold chain (envs=procedural or envs=llm); for other sets "
                           "set model.warm_start=false")
        sample = Sample.from_record(record)
        turns = json.loads(record["gold_calls"]) if isinstance(record["gold_calls"], str) else record["gold_calls"]
        states.append((sample, turns, copy.deepcopy(sample.messages)))
    examples: list[WarmupExample] = []
    max_turns = max((len(turns) for _, turns, _ in states), default=0)
    for turn_no in range(max_turns):
        active = [(i, s) for i, s in enumerate(states) if turn_no < len(s[1])]
        jobs = []
        for i, (sample, turns, messages) in active:
            calls = turns[turn_no]
            examples.append(WarmupExample(copy.deepcopy(messages), sample.tools, format_tool_calls(calls)))
            tool_calls = [make_tool_call(c["name"], c["arguments"], f"call_{turn_no}_{j}") for j, c in enumerate(calls)]
            history = copy.deepcopy(messages)
            messages.append({"role": "assistant", "content": "", "tool_calls": tool_calls})
            jobs.append((sample.codes, tool_calls, TurnContext(records[i], history)))
        for (i, (sample, turns, messages)), outputs in zip(active, execute(jobs)):
            tool_calls = messages[-1]["tool_calls"]
            messages.extend({"role": "tool", "content": out, "tool_call_id": call["id"]}
                            for call, out in zip(tool_calls, outputs))
    for sample, _, messages in states:
        examples.append(WarmupExample(messages, sample.tools, final_answer_text(sample.answer)))
    return examples


def tokenize_examples(examples: Sequence[WarmupExample], engine: Any, tokenizer: Any,
                      ) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, target ids + end-of-turn) pairs, rendered exactly as generation renders prompts."""
    from ftrl.llm.engines.base import ChatRequest

    pairs = []
    for example in examples:
        prompt = engine.render(ChatRequest(messages=example.messages, tools=example.tools))
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        target_ids = tokenizer(example.target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        pairs.append((prompt_ids, target_ids))
    return pairs


def sft_loss(model: torch.nn.Module, pairs: Sequence[tuple[list[int], list[int]]], pad_id: int,
             device: torch.device) -> torch.Tensor:
    """Mean cross-entropy over target tokens of a batch of (prompt, target) pairs (padding-free where possible)."""
    from ftrl.train.batch import batch_logprobs, make_token_batch

    batch = make_token_batch([p for p, _ in pairs], [t for _, t in pairs], pad_id).to(device)
    log_probs, _ = batch_logprobs(model, batch)
    mask = batch.response_mask[:, :log_probs.shape[1]]
    return -(log_probs * mask).sum() / mask.sum()


def run_warmup(ctx: RunContext, base_policy: Path | str) -> dict[str, Any]:
    """``warmup`` step: SFT the base model on gold turns and save ``warmup/checkpoint``."""
    from ftrl.collect import executor_from_config
    from ftrl.envs.io import read_records
    from ftrl.llm.engines.hf import HFEngine
    from ftrl.llm.models import load_model_and_tokenizer, resolve_device
    from ftrl.train.checkpoint import save_hf_checkpoint
    from ftrl.train.native import build_optimizer

    cfg = ctx.cfg
    settings = cfg.warmup
    device = resolve_device(cfg.resources.device)
    torch.manual_seed(cfg.seed)
    records = read_records(ctx.run_dir.envs("train"))
    if settings.num_trajectories is not None:
        records = records[: settings.num_trajectories]
    model, tokenizer = load_model_and_tokenizer(str(base_policy), dtype=cfg.model.dtype, device=str(device))
    engine = HFEngine(model, tokenizer, enable_thinking=cfg.mode.enable_thinking, device=device)
    examples = gold_examples(records, executor_from_config(cfg))
    pairs = tokenize_examples(examples, engine, tokenizer)
    log.info("warmup: %d gold turns from %d environments, %d steps x batch %d, lr %g", len(pairs), len(records),
             settings.steps, settings.batch_size, settings.lr)
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], settings.lr, 0.0)
    rng = random.Random(cfg.seed)
    history_path = ctx.run_dir.warmup_history
    history_path.parent.mkdir(parents=True, exist_ok=True)
    history_path.unlink(missing_ok=True)
    model.train()
    started = time.time()
    losses = []
    bar = progress(range(settings.steps), desc="warmup", unit="step")
    for step in bar:
        batch = [pairs[rng.randrange(len(pairs))] for _ in range(settings.batch_size)]
        loss = sft_loss(model, batch, tokenizer.pad_token_id, device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
        with open(history_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": step + 1, "warmup/loss": loss.item()}) + "\n")
        if ctx.tracker is not None:
            ctx.tracker.log({"warmup/loss": loss.item()})
    save_hf_checkpoint(model, tokenizer, ctx.run_dir.checkpoint_dir("warmup"))
    seconds = time.time() - started
    tail = losses[-10:]
    log.info("warmup: loss %.3f -> %.3f in %.0f s", losses[0], sum(tail) / len(tail), seconds)
    return {"examples": len(pairs), "loss_first": losses[0], "loss_last": sum(tail) / len(tail),
            "seconds": round(seconds, 1)}
