"""A tiny world for trainer tests: a run config's procedural environments and a tiny base model on disk."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ftrl.envs.procedural import build_procedural_envs
from ftrl.llm.tiny import atomic_words_from_records, corpus_from_records, create_tiny_base


def build_tiny_world(cfg: Any, tmp: Path) -> dict[str, Any]:
    """``{"envs": {split: records}, "base": model dir}`` built from ``cfg`` (envs.procedural, model.tiny, seed)."""
    envs = build_procedural_envs(cfg.envs.procedural, seed=cfg.seed)
    base = create_tiny_base(cfg.model.tiny, corpus_from_records(envs["train"]), tmp / "base", seed=cfg.seed,
                            atomic_words=atomic_words_from_records(envs["train"]))
    return {"envs": envs, "base": base}
