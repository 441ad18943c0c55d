"""Benchmark stage ``episodes``: the shared episode loop against one conversation at a time with HF ``generate``.

Evaluation (greedy) and collection (sampling) episodes on the same environments and model:

* ours: ``ftrl.collect.run_episodes`` with the engine a run uses (``HFEngine.from_config``: packed
  decoding, prefix cache) at the run's batch size;
* baseline: the reference scripts' loop, one conversation at a time: render the whole history,
  ``model.generate``, parse, run the calls, repeat;
* also shown: the same loop with batched ``generate`` (this project's engine before packed decoding).

Checks: greedy conversations equal the baseline's (tool-call ids aside, they are random); sampled
collection equals batched ``generate``'s under the same seed; resident memory does not grow over the
second half of the episodes.

    python -m ftrl.bench episodes --quick
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from typing import Any

import torch

from ftrl.bench.report import Measure
from ftrl.bench.world import BenchContext, World
from ftrl.llm.engines.base import ChatEngine, ChatRequest, Generation, SamplingParams

EPISODES = {"quick": (12, 8), "full": (100, 64)}  # (eval episodes, collection episodes)
RSS_GROWTH_LIMIT_MB = 64.0


class OneAtATime(ChatEngine):
    """The reference scripts' generation: each conversation alone, its whole history through ``generate``."""

    def __init__(self, model: Any, tokenizer: Any, stop_ids: Sequence[int], enable_thinking: bool) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.stop_ids = list(stop_ids)
        self.enable_thinking = enable_thinking

    def render(self, request: ChatRequest) -> str:
        return self.tokenizer.apply_chat_template(request.messages, tools=request.tools or None,
                                                  add_generation_prompt=True, enable_thinking=self.enable_thinking,
                                                  tokenize=False)

    @torch.inference_mode()
    def generate(self, requests: Sequence[ChatRequest], params: SamplingParams) -> list[list[Generation]]:
        sampling = {"do_sample": False} if params.greedy else {
            "do_sample": True, "temperature": params.temperature, "top_p": params.top_p, "top_k": 0}
        results = []
        for request in requests:
            ids = self.tokenizer(self.render(request), add_special_tokens=False, return_tensors="pt")
            output = self.model.generate(**ids, max_new_tokens=params.max_new_tokens, eos_token_id=self.stop_ids,
                                         pad_token_id=self.tokenizer.pad_token_id, **sampling)
            response = output[0, ids["input_ids"].shape[1]:].tolist()
            end = next((i for i, token in enumerate(response) if token in self.stop_ids), None)
            response = response if end is None else response[: end + 1]
            text = self.tokenizer.decode(response, skip_special_tokens=True)
            results.append([Generation(text, ids["input_ids"][0].tolist(), response,
                                       "length" if end is None else "stop")])
        return results


class Counting(ChatEngine):
    """Counts the tokens an engine generates."""

    def __init__(self, engine: ChatEngine) -> None:
        self.engine, self.tokens = engine, 0

    def render(self, request: ChatRequest) -> str:
        return self.engine.render(request)

    def generate(self, requests: Sequence[ChatRequest], params: SamplingParams) -> list[list[Generation]]:
        results = self.engine.generate(requests, params)
        self.tokens += sum(len(g.token_ids) for group in results for g in group)
        return results


def rss_mb() -> float:
    """Resident memory of this process (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * 4096 / 2**20
    except OSError:  # pragma: no cover
        return 0.0


def _outcome(episode: Any) -> dict[str, Any]:
    messages = copy.deepcopy(episode.messages)
    for message in messages:
        message.pop("tool_call_id", None)
        for call in message.get("tool_calls") or []:
            call.pop("id", None)
    return {"index": episode.index, "messages": messages, "calls": episode.calls, "solved": episode.solved,
            "turns": episode.turns}


def play(engine: ChatEngine, world: World, records: Sequence[dict], params: SamplingParams, batch_size: int,
         max_turns: int) -> dict[str, Any]:
    """Run the episodes; their outcomes, seconds, generated tokens and resident memory along the way."""
    from ftrl.collect import executor_from_config, parser_from_config, run_episodes

    counting = Counting(engine)
    outcomes: list[dict[str, Any]] = []
    memory: list[float] = []

    def on_done(episode: Any) -> None:
        outcomes.append(_outcome(episode))
        memory.append(rss_mb())

    started = time.perf_counter()
    run_episodes(counting, list(enumerate(records)), params=params, max_turns=max_turns,
                 parser=parser_from_config(world.cfg), execute=executor_from_config(world.cfg), on_done=on_done,
                 batch_size=batch_size, snapshots=True, progress=False)
    seconds = time.perf_counter() - started
    outcomes.sort(key=lambda row: row["index"])
    half = memory[len(memory) // 2 - 1] if len(memory) > 1 else (memory[0] if memory else 0.0)
    return {"outcomes": outcomes, "seconds": seconds, "tokens": counting.tokens,
            "calls": sum(o["calls"] for o in outcomes), "solved": sum(o["solved"] for o in outcomes),
            "turns": sum(o["turns"] for o in outcomes),
            "rss_growth_mb": (memory[-1] - half) if memory else 0.0}


def _engines(world: World, batch_size: int) -> dict[str, ChatEngine]:
    from ftrl.llm.engines.hf import HFEngine

    cfg = world.cfg
    ours = HFEngine.from_config(cfg, world.model_dir, batch_size=batch_size)
    before = HFEngine(ours.model, ours.tokenizer, enable_thinking=cfg.mode.enable_thinking, batch_size=batch_size,
                      decoder="generate", device=ours.device)
    reference = OneAtATime(ours.model, ours.tokenizer, ours.stop_token_ids, cfg.mode.enable_thinking)
    return {"ours": ours, "batched_generate": before, "reference": reference}


def run(ctx: BenchContext) -> list[Measure]:
    """Evaluation and collection episodes: ours vs one at a time (and batched generate)."""
    world = ctx.world()
    cfg = world.cfg
    n_eval, n_collect = EPISODES["quick" if world.quick else "full"]
    eval_params = SamplingParams(temperature=0.0, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    collect_params = SamplingParams(temperature=cfg.collect.temperature, top_p=cfg.collect.top_p,
                                    max_new_tokens=cfg.max_new_tokens, seed=cfg.seed * 1009 + 1)
    engines = _engines(world, cfg.eval.batch_size)
    play(engines["ours"], world, world.test[:2], eval_params, cfg.eval.batch_size, cfg.eval.max_turns)  # warm-up
    engines["ours"].prefix_cache.clear()
    evals = {name: play(engine, world, world.test[:n_eval], eval_params,
                        1 if name == "reference" else cfg.eval.batch_size, cfg.eval.max_turns)
             for name, engine in engines.items()}
    engines["ours"].prefix_cache.clear()
    collects = {name: play(engines[name], world, world.train[:n_collect], collect_params,
                           1 if name == "reference" else cfg.collect.batch_size, cfg.collect.max_turns)
                for name in ("ours", "batched_generate", "reference")}
    return _measures(world, evals, collects, engines["ours"])


def _rate(result: dict[str, Any], key: str | None = None) -> float:
    count = len(result["outcomes"]) if key is None else result[key]
    return count / max(result["seconds"], 1e-9)


def _measures(world: World, evals: dict[str, dict], collects: dict[str, dict], ours_engine: Any) -> list[Measure]:
    ours, ref, before = evals["ours"], evals["reference"], evals["batched_generate"]
    details = {name: {k: v for k, v in result.items() if k != "outcomes"} for name, result in evals.items()}
    details["batched_generate_episodes_per_s"] = _rate(before)
    details["prefix_cache"] = {"hits": ours_engine.prefix_cache.hits,
                               "reused_tokens": ours_engine.prefix_cache.reused_tokens}
    checks = {"greedy_outputs_equal": ours["outcomes"] == ref["outcomes"] == before["outcomes"],
              "rss_flat": ours["rss_growth_mb"] < RSS_GROWTH_LIMIT_MB}
    measures = [
        Measure("episodes", "episodes", f"evaluation episodes/s, greedy, {len(ours['outcomes'])} test envs",
                "episodes/s", _rate(ours), _rate(ref), "one conversation at a time, HF generate",
                checks=checks, details=details),
        Measure("episodes.tokens", "episodes", "generated tokens/s in the evaluation episodes", "tokens/s",
                _rate(ours, "tokens"), _rate(ref, "tokens"), "one conversation at a time, HF generate"),
    ]
    c_ours, c_ref, c_before = collects["ours"], collects["reference"], collects["batched_generate"]
    measures.append(Measure(
        "episodes.collect", "episodes", f"collection episodes/s, sampling, {len(c_ours['outcomes'])} train envs",
        "episodes/s", _rate(c_ours), _rate(c_ref), "one conversation at a time, HF generate",
        checks={"sampled_equal_to_batched_generate": c_ours["outcomes"] == c_before["outcomes"],
                "rss_flat": c_ours["rss_growth_mb"] < RSS_GROWTH_LIMIT_MB},
        details={name: {k: v for k, v in r.items() if k != "outcomes"} for name, r in collects.items()}
        | {"batched_generate_episodes_per_s": _rate(c_before)}))
    return measures
