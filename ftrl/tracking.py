"""Metric tracking: console always, Weights & Biases when ``logger=wandb`` (offline by default).

One W&B run per job, grouped by experiment (``logger.wandb.group``, default the run name), tagged
with the chosen config options, always finished (also on errors). Metric names are the same for
both backends (``reward/score``, ``actor/kl``, ``ftrl_test/solve_f1``...).

    python -m ftrl.run logger=wandb +debug=smoke      # then: wandb sync outputs/.../wandb/offline-run-*
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping

from ftrl.config import RunConfig, to_container

log = logging.getLogger(__name__)


def config_tags(cfg: RunConfig) -> list[str]:
    """The chosen option of each config group, as W&B tags (``algorithm:grpo`` ...)."""
    return [
        f"model:{cfg.model.name}", f"mode:{cfg.mode.name}", f"algorithm:{cfg.algorithm.name}",
        f"reward:{cfg.reward.name}", f"freeze:{cfg.freeze.name}", f"envs:{cfg.envs.name}",
        f"backend:{cfg.backend.name}", f"peft:{cfg.peft.name}",
    ]


class Tracker:
    """Fan-out of metric logging. ``step`` is the global training step across rounds."""

    def __init__(self, cfg: RunConfig, job_type: str = "pipeline") -> None:
        self.cfg = cfg
        self._wandb_run = None
        if cfg.logger.name == "wandb" and cfg.logger.wandb.mode != "disabled" and os.environ.get(
                "WANDB_MODE") != "disabled":
            import wandb

            settings = cfg.logger.wandb
            self._wandb_run = wandb.init(
                project=settings.project, entity=settings.entity, group=settings.group or cfg.name,
                name=os.path.basename(os.path.normpath(cfg.run_dir)) or cfg.name, job_type=job_type,
                tags=config_tags(cfg) + list(settings.tags), config=to_container(cfg), mode=settings.mode,
                dir=cfg.run_dir, resume="allow", id=_stable_run_id(cfg),
            )
            log.info("wandb: mode=%s project=%s run=%s", settings.mode, settings.project, self._wandb_run.id)

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        if self._wandb_run is not None:
            # W&B's own step must only grow; stages log at different paces, so the training step
            # travels as a metric (the x-axis to choose in the dashboard) instead.
            payload = dict(metrics)
            if step is not None:
                payload["trainer/global_step"] = step
            self._wandb_run.log(payload)

    def summary(self, metrics: Mapping[str, Any]) -> None:
        if self._wandb_run is not None:
            self._wandb_run.summary.update(dict(metrics))

    def finish(self, exit_code: int = 0) -> None:
        if self._wandb_run is not None:
            self._wandb_run.finish(exit_code=exit_code)
            self._wandb_run = None


def _stable_run_id(cfg: RunConfig) -> str:
    """Same run directory -> same W&B id, so a resumed run continues its W&B run."""
    import hashlib

    return hashlib.sha1(os.path.abspath(cfg.run_dir).encode()).hexdigest()[:16]
