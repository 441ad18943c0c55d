"""Environment sources by name (``envs.name``): each turns the run config into train/test records.

    python -m ftrl.run stages=[build_envs] envs=procedural
"""

from __future__ import annotations

from typing import Any

from ftrl.config import RunConfig

Records = dict[str, list[dict[str, Any]]]


def procedural(cfg: RunConfig) -> Records:
    from ftrl.envs.procedural import build_procedural_envs

    return build_procedural_envs(cfg.envs.procedural, seed=cfg.seed)


def ftrl_files(cfg: RunConfig) -> Records:
    from ftrl.envs.io import load_ftrl_files

    return load_ftrl_files(cfg.envs.files)
