"""The state every stage shares: the validated config, the run directory, and which checkpoints exist.

A leaf module (it imports only the config and the run-directory layout), so stages, trainers,
evaluation and analysis can all take a typed :class:`RunContext` without importing the pipeline.

    python -c "from ftrl.run_state import RunContext; help(RunContext.checkpoints)"
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftrl.artifacts import RunDir
from ftrl.config import RunConfig


@dataclass
class Step:
    """One resumable unit of work: ``name`` is its marker, ``stage`` the user-facing stage."""

    name: str
    stage: str
    run: Callable[[RunContext], dict[str, Any] | None]
    describe: str = ""
    # Run even when its marker exists: the step keeps per-item markers of its own (eval evaluates only
    # the checkpoints it has not evaluated yet, e.g. one a later round added).
    recheck: bool = False


@dataclass
class RunContext:
    """What every stage needs: the validated config, the run directory and shared services."""

    cfg: RunConfig
    run_dir: RunDir
    tracker: Any = None
    cache: dict[str, Any] = field(default_factory=dict)
    steps_run: list[str] = field(default_factory=list)  # the steps this invocation ran (not skipped)

    # ------------------------------------------------------------ checkpoints
    def base_policy(self) -> Path | str:
        """The starting model: the tiny model built for this run, or the configured path/hub id."""
        if self.cfg.model.path is not None:
            return self.cfg.model.path
        return self.run_dir.base_model

    def policy_for_round(self, k: int) -> Path | str:
        """Round k collects with round k-1's checkpoint (round 1: the warm start, else the base)."""
        if k > 1:
            return self.run_dir.checkpoint_dir(f"round{k - 1}")
        if self.warm_start_enabled():
            return self.run_dir.checkpoint_dir("warmup")
        return self.base_policy()

    def warm_start_enabled(self) -> bool:
        return bool(self.cfg.model.warm_start) and "train" in self.cfg.stages

    def rounds(self) -> int:
        if "train" in self.cfg.stages:
            return self.cfg.train.rounds
        return 1 if "collect" in self.cfg.stages else 0

    def checkpoints(self) -> list[tuple[str, Path | str]]:
        """Every checkpoint of this run that exists, in training order (base first)."""
        found: list[tuple[str, Path | str]] = [("base", self.base_policy())]
        warmup = self.run_dir.checkpoint_dir("warmup")
        if _is_complete_checkpoint(warmup):
            found.append(("warmup", warmup))
        k = 1
        while _is_complete_checkpoint(self.run_dir.checkpoint_dir(f"round{k}")):
            found.append((f"round{k}", self.run_dir.checkpoint_dir(f"round{k}")))
            k += 1
        return found


def _is_complete_checkpoint(path: Path) -> bool:
    return (path / "config.json").exists() and any(path.glob("*.safetensors"))
