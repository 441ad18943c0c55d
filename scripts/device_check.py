"""Device check for a small, closed GPU box (torch + transformers + peft; no vLLM, Ray or verl; no network).

Every phase is timed and prints one ``PASS <phase> (<s>s) ...`` / ``FAIL <phase> (<s>s): <why>`` /
``SKIP <phase>: <why>`` line; the exit status is the number of FAILs. ``--dry`` runs every phase on
CPU at toy size (CI runs it: tests/test_device_check.py), so the script itself is known to work
before device time is spent on it.

Phases:

* ``env``       torch / transformers / CUDA as seen here;
* ``native``    the default pipeline shrunk to minutes (``+debug=smoke``: warm start, collect, one GRPO
  round, eval) on the device (HF engine), with its episodes/s and generated tokens/s; with ``--cpu-baseline``
  the same run on CPU beside it;
* ``fsdp``      torch's FSDP (FSDP1 and FSDP2 ``fully_shard``, one process) with ftrl's freeze policy applied
  before wrapping, as ``ftrl/train/verl_worker.py`` applies it inside verl's actor: a few AdamW steps,
  a full state-dict checkpoint written and reloaded into a fresh HF model; frozen tensors bit-identical,
  trainable ones changed, no optimizer state for frozen ones. (verl's own FSDP engine needs verl and
  Ray, which this box lacks: covered by ``scripts/gpu_smoke.sh`` on a box that can install packages.)
* ``verl-reward`` the verl reward function (``ftrl.train.verl_reward.compute_score``) on rows written
  by ``verl_row`` from real snapshots, decoded from real token ids, scores exactly like the native reward.

    python scripts/device_check.py --dry                # CPU, toy sizes (~1-2 min on 2 cores)
    python scripts/device_check.py --cpu-baseline       # on the GPU box (one call, ~8 min budget)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS: list[dict[str, Any]] = []


def phase(name: str, function: Callable[[], str | None]) -> None:
    """Run one phase; print its PASS/FAIL/SKIP line with its wall time."""
    start = time.perf_counter()
    try:
        detail = function() or ""
        status = "SKIP" if detail.startswith("SKIP:") else "PASS"
    except Exception as error:  # noqa: BLE001 - every phase reports its own failure and the next one runs
        status, detail = "FAIL", f"{type(error).__name__}: {error}"
    seconds = time.perf_counter() - start
    RESULTS.append({"phase": name, "status": status, "seconds": round(seconds, 2), "detail": detail})
    if status == "SKIP":
        print(f"SKIP {name}: {detail[5:].strip()}", flush=True)
    elif status == "PASS":
        print(f"PASS {name} ({seconds:.1f}s) {detail}".rstrip(), flush=True)
    else:
        print(f"FAIL {name} ({seconds:.1f}s): {detail}", flush=True)


# ------------------------------------------------------------------------------------ env
def check_env(device: str) -> str:
    import torch
    import transformers

    info = f"torch {torch.__version__} transformers {transformers.__version__} device={device}"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("torch sees no CUDA device")
        info += f" gpu={torch.cuda.get_device_name(0)}"
    return info


# ------------------------------------------------------------------------------------ native
def _native_run(work: Path, device: str, dry: bool, timeout: int) -> dict[str, Any]:
    run_dir = work / f"native_{device}"
    overrides = ["+debug=smoke", "name=device_check", f"hydra.run.dir={run_dir}", "logger=console",
                 "stages=[build_envs,collect,train,eval]", "train.rounds=1"]
    if device == "cuda":
        overrides += ["resources.device=cuda"]
    if dry:
        overrides += ["train.max_steps_per_round=1", "collect.max_envs=4", "eval.max_samples=4",
                      "warmup.steps=2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "ftrl.run", *overrides], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=timeout, check=False)
    seconds = time.perf_counter() - start
    if out.returncode != 0:
        raise RuntimeError(f"ftrl.run on {device} exited {out.returncode}: {(out.stderr or out.stdout)[-800:]}")
    # Collection throughput from the stage records; generation tokens/s from the trainer's rollouts.
    episodes = collect_s = 0.0
    for path in run_dir.glob("stages/collect_r*.json"):
        stage = json.loads(path.read_text(encoding="utf-8"))
        episodes += stage["info"]["episodes_run"]
        collect_s += stage["wall_seconds"]
    rates = [row["perf/gen_tokens_per_s"] for path in run_dir.glob("rounds/r*/train/history.jsonl")
             for row in map(json.loads, path.read_text(encoding="utf-8").splitlines()) if "perf/gen_tokens_per_s" in row]
    if not episodes or not rates:
        raise RuntimeError(f"{run_dir}: no collect stage record or no training rollout throughput")
    return {"seconds": seconds, "episodes_per_s": episodes / max(collect_s, 1e-9),
            "tokens_per_s": sum(rates) / len(rates)}


def check_native(work: Path, device: str, dry: bool, cpu_baseline: bool, timeout: int) -> str:
    result = _native_run(work, device, dry, timeout)
    line = (f"{device}: {result['seconds']:.0f}s wall, collect {result['episodes_per_s']:.2f} episodes/s, "
            f"rollout {result['tokens_per_s']:.0f} generated tokens/s")
    if cpu_baseline and device != "cpu":
        base = _native_run(work, "cpu", dry, timeout)
        line += (f" | cpu: {base['seconds']:.0f}s wall, collect {base['episodes_per_s']:.2f} episodes/s, "
                 f"rollout {base['tokens_per_s']:.0f} generated tokens/s")
    return line


# ------------------------------------------------------------------------------------ fsdp + freeze
def _freeze_hook() -> Any:
    """``ftrl.train.verl_worker.wrap_build_module``; without verl, a stand-in for the one class it patches."""
    import importlib.util
    import types

    if importlib.util.find_spec("verl") is None:
        names = ["verl", "verl.workers", "verl.workers.engine", "verl.workers.engine.fsdp",
                 "verl.workers.engine.fsdp.transformer_impl"]
        for name in names:
            sys.modules.setdefault(name, types.ModuleType(name))

        class FSDPEngine:  # what install() wraps at import; the check calls the wrapper directly
            def _build_module(self) -> Any:
                raise NotImplementedError

        sys.modules[names[-1]].FSDPEngine = FSDPEngine  # type: ignore[attr-defined]
    from ftrl.train.verl_worker import wrap_build_module

    return wrap_build_module


def _fsdp_run(version: int, device: str, work: Path) -> str:
    from dataclasses import asdict
    from types import SimpleNamespace

    import torch
    import torch.distributed as dist

    from ftrl.config import FreezeConfig, TinyModelConfig
    from ftrl.llm.tiny import build_tiny_model, build_tokenizer, builtin_corpus
    from ftrl.train.verl_backend import FREEZE_FILE_ENV

    tokenizer = build_tokenizer(builtin_corpus(), vocab_size=600)
    shape = TinyModelConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=128, vocab_size=1024)
    # mlp_only: the MLPs train, everything else (attention, norms, embeddings) is frozen; applied by the
    # hook verl's actor runs (ftrl/train/verl_worker.py) on the built model, before the FSDP wrap.
    policy = work / f"fsdp{version}_freeze_policy.json"
    policy.write_text(json.dumps(asdict(FreezeConfig(name="mlp_only", modules=["mlp"], action="train"))),
                      encoding="utf-8")
    os.environ[FREEZE_FILE_ENV] = str(policy)
    engine = SimpleNamespace(engine_config=SimpleNamespace(forward_only=False, strategy="fsdp" if version == 1
                                                           else "fsdp2", use_orig_params=True),
                             model_config=SimpleNamespace(model_type="language_model"), _is_lora=False, rank=0)
    model = _freeze_hook()(lambda _engine: build_tiny_model(shape, tokenizer, seed=0))(engine)
    before = {name: tensor.detach().clone() for name, tensor in build_tiny_model(shape, tokenizer, seed=0)
              .state_dict().items()}
    if not (work / "freeze_report.json").is_file() and not any(work.glob("*report*.json")):
        raise RuntimeError("the freeze hook wrote no report")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    if not trainable or len(trainable) == len(list(model.parameters())):
        raise RuntimeError(f"freeze policy selected {len(trainable)} trainable tensors")
    model.to(device)
    if version == 1:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        wrapped: Any = FSDP(model, use_orig_params=True, device_id=torch.device(device) if device == "cuda" else None)
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        wrapped = fully_shard(model)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), device=device)
    for _ in range(3):
        loss = wrapped(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    if any(p.requires_grad is False and p in optimizer.state for p in wrapped.parameters()):
        raise RuntimeError("the optimizer holds state for a frozen tensor")
    states = len(optimizer.state)
    if states != len(params):
        raise RuntimeError(f"optimizer state for {states} tensors, {len(params)} trainable")
    # Full (unsharded) state dict -> HF checkpoint -> fresh model.
    if version == 1:
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType

        with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT, FullStateDictConfig(offload_to_cpu=True)):
            full = wrapped.state_dict()
    else:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    full = {name.replace("_fsdp_wrapped_module.", ""): tensor.detach().cpu() for name, tensor in full.items()}
    target = work / f"fsdp{version}_merged"
    fresh = build_tiny_model(shape, tokenizer, seed=1)
    missing, unexpected = fresh.load_state_dict(full, strict=False)
    if unexpected or [m for m in missing if "lm_head" not in m]:
        raise RuntimeError(f"merge: missing {missing[:3]} unexpected {unexpected[:3]}")
    fresh.save_pretrained(target)
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(target).state_dict()
    frozen_changed = [n for n, t in before.items() if n not in trainable and n in merged
                      and not torch.equal(merged[n], t)]
    trained_same = [n for n in trainable if n in merged and torch.equal(merged[n], before[n])]
    if frozen_changed:
        raise RuntimeError(f"frozen tensors changed: {frozen_changed[:3]}")
    if trained_same:
        raise RuntimeError(f"trainable tensors unchanged: {trained_same[:3]}")
    del dist
    return f"fsdp{version}: {len(trainable)} trainable tensors changed, frozen bit-identical, {states} optimizer states"


def check_fsdp(work: Path, device: str) -> str:
    import torch
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)
    if device == "cuda":
        torch.cuda.set_device(0)
    lines = []
    try:
        for version in (1, 2):
            try:
                lines.append(_fsdp_run(version, device, work))
            except RuntimeError as error:
                if device != "cpu" or "accelerator" not in str(error):
                    raise
                lines.append(f"fsdp{version}: needs a GPU (dry run on CPU)")
    finally:
        dist.destroy_process_group()
    return "; ".join(lines)


# ------------------------------------------------------------------------------------ verl reward
def check_verl_reward(work: Path) -> str:
    from ftrl.config import ProceduralConfig
    from ftrl.envs.procedural import build_procedural_envs
    from ftrl.llm.tiny import build_tokenizer, corpus_from_records
    from ftrl.reward import score_response
    from ftrl.train.verl_backend import RESPONSE_TEXT_KEY, verl_row
    from ftrl.train.verl_reward import compute_score
    from ftrl.types import as_json_obj

    records = build_procedural_envs(ProceduralConfig(num_train=6, num_test=0), seed=3)["train"]
    tokenizer = build_tokenizer(corpus_from_records(records), vocab_size=800)
    checked = 0
    for index, record in enumerate(records):
        gold = as_json_obj(record.get("gold_calls") or "[]")
        calls = gold[0] if gold else []
        text = "".join('<tool_call>\n' + json.dumps({"name": c["name"], "arguments": c["arguments"]}) +
                       '\n</tool_call>' for c in calls) + "<|im_end|>"
        for response in (text, f"The answer is {record['answer']}<|im_end|>", "<|im_end|>"):
            ids = tokenizer(response, add_special_tokens=False)["input_ids"]
            decoded = tokenizer.decode(ids, skip_special_tokens=False)
            row = verl_row(record, index)
            info = {**row["extra_info"], RESPONSE_TEXT_KEY: decoded}
            verl = compute_score(row["data_source"], decoded, row["reward_model"]["ground_truth"], info)
            native = score_response(decoded, record).score
            if abs(verl["score"] - native) > 1e-12:
                raise RuntimeError(f"row {index}: verl {verl['score']} != native {native} for {response[:60]!r}")
            checked += 1
    loop = _agent_loop_check(records[0], tokenizer)
    return f"{checked} responses from real token ids score like the native reward; {loop}"


def _agent_loop_check(record: dict[str, Any], tokenizer: Any) -> str:
    """verl's agent loop (ours) returns the server's token ids and their text with special tokens kept."""
    import asyncio
    import importlib.util
    from types import SimpleNamespace

    if importlib.util.find_spec("verl") is None or importlib.util.find_spec("ray") is None:
        return "agent loop: skipped (verl/ray not installed here)"
    from ftrl.reward import score_response
    from ftrl.train.verl_agent_loop import FTRLStepAgentLoop
    from ftrl.train.verl_backend import RESPONSE_TEXT_KEY, verl_row
    from ftrl.train.verl_reward import compute_score

    response = f"The answer is {record['answer']}<|im_end|>"
    ids = tokenizer(response, add_special_tokens=False)["input_ids"]

    class Server:
        async def generate(self, **kwargs: Any) -> Any:
            return SimpleNamespace(token_ids=list(ids), log_probs=[0.0] * len(ids), num_preempted=0,
                                   stop_reason="completed", extra_fields={})

    loop = FTRLStepAgentLoop.__new__(FTRLStepAgentLoop)
    loop.response_length, loop.server_manager, loop.tokenizer = 64, Server(), tokenizer

    async def initial(messages: Any, tools: Any = None) -> list[int]:
        return tokenizer(tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True,
                                                       tokenize=False), add_special_tokens=False)["input_ids"]

    loop.ct_build_initial_tokens = initial  # type: ignore[method-assign]
    row = verl_row(record, 0)
    out = asyncio.run(loop.run({}, raw_prompt=row["prompt"], extra_info=row["extra_info"]))
    text = out.extra_fields[RESPONSE_TEXT_KEY]
    verl = compute_score(row["data_source"], text, row["reward_model"]["ground_truth"],
                         {**row["extra_info"], RESPONSE_TEXT_KEY: text})["score"]
    native = score_response(text, record).score
    if out.response_ids != ids or verl != native:
        raise RuntimeError(f"agent loop: ids kept {out.response_ids == ids}, verl {verl} vs native {native}")
    return f"agent loop: {len(ids)} token ids -> score {verl:.3f} = native"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry", action="store_true", help="every phase on CPU at toy size (CI)")
    parser.add_argument("--cpu-baseline", action="store_true", help="also run the native phase on CPU")
    parser.add_argument("--phases", default="env,native,fsdp,verl-reward")
    parser.add_argument("--work", default=None, help="work directory (default: a fresh temporary one)")
    parser.add_argument("--native-timeout", type=int, default=300)
    parser.add_argument("--json", default=None, help="write the phase results here")
    args = parser.parse_args(argv)

    import torch

    device = "cpu" if args.dry or not torch.cuda.is_available() else "cuda"
    if not args.dry and device == "cpu":
        print("FAIL env: no CUDA device (use --dry for the CPU check)", flush=True)
        return 1
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)) if args.dry else (os.cpu_count() or 1))
    work = Path(args.work or tempfile.mkdtemp(prefix="ftrl_device_check_"))
    work.mkdir(parents=True, exist_ok=True)
    wanted = set(args.phases.split(","))
    started = time.perf_counter()
    if "env" in wanted:
        phase("env", lambda: check_env(device))
    if "native" in wanted:
        phase("native", lambda: check_native(work, device, args.dry, args.cpu_baseline, args.native_timeout))
    if "fsdp" in wanted:
        phase("fsdp", lambda: check_fsdp(work, device))
    if "verl-reward" in wanted:
        phase("verl-reward", lambda: check_verl_reward(work))
    failures = sum(result["status"] == "FAIL" for result in RESULTS)
    print(f"{'PASS' if not failures else 'FAIL'} device_check ({time.perf_counter() - started:.1f}s, "
          f"{failures} failure(s), device={device}{', dry' if args.dry else ''})", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(RESULTS, indent=1) + "\n", encoding="utf-8")
    return failures


if __name__ == "__main__":
    sys.exit(main())
