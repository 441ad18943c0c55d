"""The benchmark's world: environments, a tiny model that calls tools, and the run config around them.

Built once under ``<out>/world`` (``world-quick`` with ``--quick``) and reused: procedural
environments from the run config (``+debug=smoke`` for ``--quick``), the tiny model with a short copy
pretraining, then a short warm start on gold turns so episodes have several turns. ``--run DIR``
takes a finished run's environments and its last checkpoint instead.

    python -m ftrl.bench episodes --quick --out /tmp/bench
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ftrl.config import RunConfig
from ftrl.run import CONF_DIR

log = logging.getLogger(__name__)

# Copy-pretraining steps, warm-start steps, batch and learning rate of the benchmark's model: enough
# for it to call tools, so episodes have several turns.
WORLD_STEPS = {"quick": (10, 150, 16, 5e-3), "full": (100, 150, 16, 2e-3)}
WORLD_MARKER = "world.json"


@dataclass
class World:
    """What every stage benchmarks on."""

    cfg: RunConfig
    model_dir: Path
    train: list[dict[str, Any]]
    test: list[dict[str, Any]]
    quick: bool


class BenchContext:
    """What a stage gets: the run config, the mode, and the world (built on first use)."""

    def __init__(self, out_dir: Path, quick: bool, run: Path | None = None) -> None:
        self.out_dir, self.quick, self.run = Path(out_dir), quick, run
        self.cfg = bench_config(self.out_dir / "config-only", quick)
        self._world: World | None = None

    def world(self) -> World:
        if self._world is None:
            self._world = build_world(self.out_dir, self.quick, self.run)
        return self._world


def bench_config(run_dir: Path, quick: bool, overrides: Sequence[str] = ()) -> RunConfig:
    """The default run's config (``+debug=smoke`` when quick), validated, with ``run_dir``."""
    from hydra import compose, initialize_config_dir

    from ftrl.config import load_run_config

    options = (["+debug=smoke"] if quick else []) + [f"run_dir={run_dir}", *overrides]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return load_run_config(compose(config_name="config", overrides=options))


def build_world(out_dir: Path, quick: bool, run: Path | None = None) -> World:
    """The world under ``out_dir`` (built on first use), or a finished run's (``run``)."""
    from ftrl.envs.io import read_records

    if run is not None:
        return _run_world(Path(run), quick)
    root = Path(out_dir) / ("world-quick" if quick else "world")
    cfg = bench_config(root, quick)
    model_dir = root / "warm"
    if not (root / WORLD_MARKER).is_file():
        _build(root, cfg, quick)
    return World(cfg, model_dir, read_records(root / "train.jsonl"), read_records(root / "test.jsonl"), quick)


def _run_world(run: Path, quick: bool) -> World:
    from ftrl.envs.io import read_records

    rounds = sorted((p for p in (run / "rounds").glob("r*/checkpoint") if p.is_dir()),
                    key=lambda p: int(p.parent.name[1:]))
    candidates = rounds or [run / "warmup" / "checkpoint"]
    model_dir = candidates[-1]
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"--run {run}: no checkpoint under rounds/r*/checkpoint or warmup/checkpoint")
    cfg = bench_config(Path("/tmp") / "ftrl-bench-run", quick)
    return World(cfg, model_dir, read_records(run / "envs" / "train.jsonl"), read_records(run / "envs" / "test.jsonl"),
                 quick)


def _build(root: Path, cfg: RunConfig, quick: bool) -> None:
    from ftrl.artifacts import atomic_write_text
    from ftrl.envs.io import write_jsonl
    from ftrl.envs.procedural import build_procedural_envs
    from ftrl.llm.tiny import atomic_words_from_records, corpus_from_records, create_tiny_base

    copy_steps, warm_steps, batch, lr = WORLD_STEPS["quick" if quick else "full"]
    envs = build_procedural_envs(cfg.envs.procedural, seed=cfg.seed)
    root.mkdir(parents=True, exist_ok=True)
    write_jsonl(root / "train.jsonl", envs["train"])
    write_jsonl(root / "test.jsonl", envs["test"])
    tiny = dataclasses.replace(cfg.model.tiny, copy_pretrain_steps=copy_steps)
    log.info("bench world: tiny model (%d copy steps), warm start %d steps", copy_steps, warm_steps)
    base = create_tiny_base(tiny, corpus_from_records(envs["train"]), root / "base", seed=cfg.seed,
                            atomic_words=atomic_words_from_records(envs["train"]))
    warm_start(cfg, base, envs["train"], root / "warm", steps=warm_steps, batch_size=batch, lr=lr)
    atomic_write_text(root / WORLD_MARKER, json.dumps({"quick": quick, "copy_steps": copy_steps,
                                                       "warm_steps": warm_steps}) + "\n")


def sft_pairs(cfg: RunConfig, model: Any, tokenizer: Any, records: Sequence[dict[str, Any]]) -> list[tuple[list[int],
                                                                                                           list[int]]]:
    """(prompt ids, target ids) of every gold turn of ``records``, as the warm start trains on them."""
    from ftrl.collect import executor_from_config
    from ftrl.llm.engines.hf import HFEngine
    from ftrl.train.warmup import gold_examples, tokenize_examples

    engine = HFEngine(model, tokenizer, enable_thinking=cfg.mode.enable_thinking)
    return tokenize_examples(gold_examples(records, executor_from_config(cfg)), engine, tokenizer)


def warm_start(cfg: RunConfig, base: Path, records: Sequence[dict[str, Any]], out: Path, steps: int,
               batch_size: int, lr: float) -> Path:
    """A short supervised warm start (the warm-start stage's loss and optimizer), saved to ``out``."""
    from ftrl.llm.models import load_model_and_tokenizer
    from ftrl.train.checkpoint import save_hf_checkpoint
    from ftrl.train.native import build_optimizer
    from ftrl.train.warmup import sft_loss

    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model_and_tokenizer(str(base))
    pairs = sft_pairs(cfg, model, tokenizer, records)
    optimizer = build_optimizer(list(model.parameters()), lr, 0.0)
    rng = random.Random(cfg.seed)
    model.train()
    for _ in range(steps):
        loss = sft_loss(model, [pairs[rng.randrange(len(pairs))] for _ in range(batch_size)],
                        tokenizer.pad_token_id, torch.device("cpu"))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    model.eval()
    return save_hf_checkpoint(model, tokenizer, out)
