"""GPU smoke helpers for scripts/gpu_smoke.sh: build a small local model, time vLLM, report a run.

Three subcommands, each printing one ``PASS <phase>`` or ``FAIL <phase>: <why>`` line (exit 0/1):

* ``build``  — a Qwen3-shaped model (hidden 512, 8 layers, ~30M parameters) with a tokenizer fitted
  to the procedural environments, saved with ``save_pretrained``: no hub access needed;
* ``vllm``   — ``VLLMEngine`` (the engine ``model.engine=vllm`` selects) generates one sampled turn
  for many tool-use prompts and prints generated tokens per second;
* ``report`` — reads a finished ``backend=verl`` run directory: the round's merged checkpoint,
  verl's per-step metrics (throughput, step time) and the stage wall times.

    python scripts/gpu_smoke.py build --out /tmp/ftrl_gpu_smoke/model
    python scripts/gpu_smoke.py vllm --model /tmp/ftrl_gpu_smoke/model --prompts 256 --n 4
    python scripts/gpu_smoke.py report --run-dir /tmp/ftrl_gpu_smoke/run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SMOKE_MODEL = {
    "hidden_size": 512,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "intermediate_size": 2048,
    "vocab_size": 4096,
    "max_position_embeddings": 8192,
}


def procedural_records(count: int, seed: int = 0) -> list[dict[str, Any]]:
    from ftrl.config import ProceduralConfig
    from ftrl.envs.procedural import build_procedural_envs

    splits = build_procedural_envs(ProceduralConfig(num_train=count, num_test=0), seed=seed)
    return list(splits["train"])


def build(out: Path, seed: int) -> str:
    from ftrl.config import TinyModelConfig
    from ftrl.llm.models import count_parameters, load_model_and_tokenizer
    from ftrl.llm.tiny import builtin_corpus, corpus_from_records, create_tiny_base

    corpus = builtin_corpus() + corpus_from_records(procedural_records(400, seed))
    path = create_tiny_base(TinyModelConfig(**SMOKE_MODEL), corpus, out, seed=seed)
    model, _ = load_model_and_tokenizer(str(path), device="cpu")
    total, _ = count_parameters(model)
    return f"model at {path}: {total / 1e6:.1f}M parameters, {SMOKE_MODEL}"


def bench_vllm(model: Path, prompts: int, n: int, max_new_tokens: int, gpu_memory_utilization: float) -> str:
    from ftrl.llm.engines.base import ChatRequest, SamplingParams
    from ftrl.llm.engines.vllm import VLLMEngine
    from ftrl.types import as_json_obj

    started = time.time()
    engine = VLLMEngine.from_pretrained(str(model), dtype="bfloat16", max_model_len=4096,
                                        gpu_memory_utilization=gpu_memory_utilization)
    load_s = time.time() - started
    records = procedural_records(prompts)
    requests = [ChatRequest(messages=as_json_obj(record["messages"]), tools=as_json_obj(record["tools"]))
                for record in records]
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=max_new_tokens, n=n, seed=0)
    engine.generate(requests[:8], SamplingParams(max_new_tokens=8))  # warm-up (graph capture, caches)
    started = time.time()
    results = engine.generate(requests, params)
    seconds = time.time() - started
    generated = sum(len(g.token_ids) for per_request in results for g in per_request)
    prompt_tokens = sum(len(per_request[0].prompt_token_ids) for per_request in results)
    stopped = sum(g.finish_reason == "stop" for per_request in results for g in per_request)
    if len(results) != len(requests) or any(len(per_request) != n for per_request in results):
        raise RuntimeError(f"expected {len(requests)} x {n} generations")
    if generated == 0:
        raise RuntimeError("vLLM generated no tokens")
    engine.close()
    return (f"vllm: {len(requests)} prompts x n={n}: {generated} tokens in {seconds:.2f}s = "
            f"{generated / seconds:,.0f} generated tok/s ({prompt_tokens / len(requests):.0f} prompt tokens "
            f"per request, {stopped} stopped early, engine load {load_s:.1f}s)")


def report(run_dir: Path, k: int) -> str:
    from ftrl.artifacts import RunDir, read_json

    rd = RunDir(run_dir)
    checkpoint = rd.checkpoint_dir(f"round{k}")
    weights = sorted(checkpoint.glob("*.safetensors"))
    if not weights or not (checkpoint / "config.json").exists():
        raise RuntimeError(f"no merged HF checkpoint in {checkpoint}")
    lines = [f"checkpoint {checkpoint}: {len(weights)} safetensors file(s)"]
    for stage in ("build_envs", f"collect_r{k}", f"train_r{k}"):
        marker = rd.stage_marker(stage)
        if marker.exists():
            lines.append(f"{stage}: {read_json(marker).get('wall_seconds', '?')}s wall")
    history = rd.train_dir(k) / "history.jsonl"
    lines_of_history = history.read_text().splitlines() if history.exists() else []
    rows = [json.loads(line) for line in lines_of_history if line.strip()]
    if not rows:
        raise RuntimeError(f"no training steps recorded in {history}")
    for row in rows:
        wanted = ("reward/score", "perf/throughput", "perf/time_per_step", "timing_s/step", "timing_s/gen",
                  "actor/pg_loss", "perf/max_memory_allocated_gb")
        values = ", ".join(f"{key}={row[key]:.4g}" for key in wanted
                           if isinstance(row.get(key), (int, float)))
        lines.append(f"step {row.get('global_step', row.get('step'))}: {values}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_build = sub.add_parser("build")
    p_build.add_argument("--out", type=Path, required=True)
    p_build.add_argument("--seed", type=int, default=0)
    p_vllm = sub.add_parser("vllm")
    p_vllm.add_argument("--model", type=Path, required=True)
    p_vllm.add_argument("--prompts", type=int, default=256)
    p_vllm.add_argument("--n", type=int, default=4)
    p_vllm.add_argument("--max-new-tokens", type=int, default=256)
    p_vllm.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    p_report = sub.add_parser("report")
    p_report.add_argument("--run-dir", type=Path, required=True)
    p_report.add_argument("--round", type=int, default=1)
    args = parser.parse_args(argv)
    phase = {"build": "build-model", "vllm": "vllm-generate", "report": "verl-grpo-step"}[args.command]
    try:
        if args.command == "build":
            message = build(args.out, args.seed)
        elif args.command == "vllm":
            message = bench_vllm(args.model, args.prompts, args.n, args.max_new_tokens,
                                 args.gpu_memory_utilization)
        else:
            message = report(args.run_dir, args.round)
    except Exception as error:  # noqa: BLE001 - the smoke script reports every failure as one FAIL line
        print(f"FAIL {phase}: {type(error).__name__}: {error}")
        return 1
    print(message)
    print(f"PASS {phase}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
