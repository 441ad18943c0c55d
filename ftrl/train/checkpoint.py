"""Checkpoints: HF safetensors directories (what later rounds and eval load) and resumable trainer state.

A finished checkpoint is written to a temporary directory and renamed into place, so a directory
named ``checkpoint/`` is always complete. Trainer state (trainable weights, optimizer, scheduler,
RNG, step) is saved every ``train.save_every_steps`` steps and restored on re-run.

    python -m pytest tests/test_native_trainer.py -q -k resume
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ftrl.artifacts import atomic_dir, atomic_path

log = logging.getLogger(__name__)


def save_hf_checkpoint(model: Any, tokenizer: Any, out_dir: Path) -> Path:
    """Write ``model`` + ``tokenizer`` with save_pretrained (safetensors) atomically to ``out_dir``."""
    from ftrl.progress import quiet_library_bars
    from ftrl.train.freeze import merge_lora_for_save

    quiet_library_bars()  # no "Writing model shards" bar in a log file

    out_dir = Path(out_dir)
    plain = merge_lora_for_save(model)
    with atomic_dir(out_dir, if_exists="replace") as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out_dir


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Only tensors that train (frozen ones are reloaded from the round's start checkpoint)."""
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}


def save_trainer_state(path: Path, *, step: int, model: torch.nn.Module, optimizer: Any, scheduler: Any,
                       critic: torch.nn.Module | None = None, critic_optimizer: Any = None,
                       extra: dict[str, Any] | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "step": step,
        "model": trainable_state(model),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
        "critic": trainable_state(critic) if critic is not None else None,
        "critic_optimizer": critic_optimizer.state_dict() if critic_optimizer is not None else None,
        "extra": extra or {},
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_trainer_state(path: Path, *, model: torch.nn.Module, optimizer: Any, scheduler: Any,
                       critic: torch.nn.Module | None = None, critic_optimizer: Any = None) -> dict[str, Any]:
    payload = torch.load(path, map_location="cpu", weights_only=False)
    _load_trainable(model, payload["model"], str(path))
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    if critic is not None:
        if payload.get("critic") is None:
            raise RuntimeError(f"{path}: saved without a critic, but this run trains one")
        _load_trainable(critic, payload["critic"], str(path))
        critic_optimizer.load_state_dict(payload["critic_optimizer"])
    set_rng_state(payload["rng"])
    return payload


def _load_trainable(model: torch.nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    params = dict(model.named_parameters())
    missing = [name for name in tensors if name not in params]
    if missing:
        raise RuntimeError(f"{where}: saved tensors {missing[:3]} are not in the model (config changed?)")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))
