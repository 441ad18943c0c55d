"""Entrypoint: ``python -m ftrl.run [group=option ...] [+experiment=NAME] [+debug=smoke] [-m]``.

Composes ``conf/``, validates it once into a typed RunConfig, then runs (or resumes) the stages
build_envs -> collect -> train -> eval -> analyze in the run directory ``outputs/<name>/<overrides>``
and prints the results table.

    python -m ftrl.run                       # the default job: tiny model, procedural envs, CPU
    python -m ftrl.run --cfg job             # show the composed config
    python -m ftrl.run -m algorithm=grpo,ppo +debug=smoke
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

log = logging.getLogger("ftrl.run")


def _dirname(override_dirname: str) -> str:
    """Run sub-directory from the overrides; 'base' when there are none."""
    cleaned = override_dirname.replace("/", "_").replace("+", "")
    return cleaned or "base"


if not OmegaConf.has_resolver("ftrl_dirname"):
    OmegaConf.register_new_resolver("ftrl_dirname", _dirname)


def main(cfg: DictConfig) -> dict:
    from ftrl.config import load_run_config
    from ftrl.pipeline import run_pipeline
    from ftrl.report import print_results
    from ftrl.tracking import Tracker

    run_cfg = load_run_config(cfg)
    if run_cfg.resources.num_threads:
        import torch

        torch.set_num_threads(run_cfg.resources.num_threads)
    tracker = None if run_cfg.dry_run else Tracker(run_cfg)
    exit_code = 1
    try:
        summary = run_pipeline(run_cfg, tracker=tracker)
        exit_code = 0
    finally:
        if tracker is not None:
            tracker.finish(exit_code)
    if not run_cfg.dry_run:
        print_results(summary)
    return summary


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def hydra_main(cfg: DictConfig) -> None:
    from ftrl.config import ConfigError

    try:
        main(cfg)
    except ConfigError as error:
        log.error("config error: %s", error)
        sys.exit(2)


if __name__ == "__main__":
    if not CONF_DIR.is_dir():
        sys.exit(f"ftrl: config directory {CONF_DIR} not found; install the project with `pip install -e .`")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    hydra_main()
