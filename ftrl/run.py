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
if not OmegaConf.has_resolver("ftrl_root"):
    # The project folder (launchers/, conf/). Launcher configs use it: they are resolved in the submitting
    # process before Hydra's runtime config (``${hydra:runtime.cwd}``) exists.
    OmegaConf.register_new_resolver("ftrl_root", lambda: str(CONF_DIR.parent))


def main(cfg: DictConfig, overrides: list[str] | None = None) -> dict:
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
        summary = run_pipeline(run_cfg, tracker=tracker, overrides=overrides)
        if tracker is not None and tracker.active:
            _settle_wandb(tracker, run_cfg.run_dir)
        exit_code = 0
    finally:
        if tracker is not None:
            tracker.finish(exit_code)
    if not run_cfg.dry_run:
        print_results(summary)
    return summary


def _settle_wandb(tracker: object, run_dir: str) -> None:
    """After the pipeline: record that this W&B run got live metrics, or, if nothing new ran, replay the
    recorded ones into it (once) or say where the run's metrics already are."""
    from ftrl.artifacts import RunDir, read_json, write_json
    from ftrl.tracking import replay_recorded_metrics

    rd = RunDir(run_dir)
    run_id = tracker.wandb_run.id  # type: ignore[attr-defined]
    manifest = read_json(rd.manifest)
    if tracker.logged:  # type: ignore[attr-defined]
        if run_id not in manifest.get("wandb_live", []):
            manifest.setdefault("wandb_live", []).append(run_id)
            write_json(rd.manifest, manifest)
        return
    if run_id in manifest.get("wandb_live", []) + manifest.get("wandb_replayed", []):
        log.warning("wandb: nothing new ran; W&B run %s already holds this run's metrics (offline files under "
                    "%s/wandb; upload them with `python launchers/wandb_sync.py`)", run_id, rd.root)
        return
    sent = replay_recorded_metrics(tracker, rd.root)  # type: ignore[arg-type]
    log.warning("wandb: nothing new ran; replayed the run's %d recorded metric rows (training history and "
                "eval) into W&B run %s", sent, run_id)


def _debug() -> bool:
    return os.environ.get("FTRL_DEBUG", "").lower() in ("1", "true", "yes")


def _user_error(error: BaseException) -> int:
    """One line for a problem the user can fix (traceback with FTRL_DEBUG=1); the exit code."""
    from ftrl.errors import ConfigError

    kind = "config error" if isinstance(error, ConfigError) else "error"
    log.error("%s: %s", kind, error, exc_info=_debug())
    if not _debug():
        log.error("(FTRL_DEBUG=1 shows the traceback)")
    return 2


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def hydra_main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from ftrl.errors import FtrlError

    try:
        _log_train_algorithm_pair(HydraConfig.get().runtime.choices.get("train_algorithm@train"), cfg)
        main(cfg, overrides=list(HydraConfig.get().overrides.task))
    except FtrlError as error:
        sys.exit(_user_error(error))


def _log_train_algorithm_pair(pair: str | None, cfg: DictConfig) -> None:
    """Say when conf/train_algorithm/<train>_<algorithm>.yaml changed train.* (it is optional: most pairs have none)."""
    path = CONF_DIR / "train_algorithm" / f"{pair}.yaml"
    if pair and path.is_file():
        settings = [f"train.{key}={value}" + ("" if cfg.train[key] == value else f" (overridden: {cfg.train[key]})")
                    for key, value in OmegaConf.load(path).items()]
        log.info("conf/train_algorithm/%s.yaml sets %s", pair, ", ".join(settings))


def _command_line_overrides(argv: list[str]) -> list[str]:
    return [arg for arg in argv if "=" in arg and not arg.startswith("-")]


def precheck(argv: list[str]) -> None:
    """Checks Hydra itself would make late or not at all: unknown keys (with the valid keys of their
    section), and, for ``--cfg``/``-c`` (which prints without running), the whole config's validation."""
    from ftrl.config import check_override_keys, load_run_config, schema_keys

    overrides = _command_line_overrides(argv)
    groups = [p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name not in (schema_keys("") or [])]
    check_override_keys(overrides, groups)
    if "--cfg" in argv or "-c" in argv:
        from hydra import compose, initialize_config_dir

        job = [o for o in overrides if not o.lstrip("+~").startswith(("hydra.", "hydra/"))]
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            load_run_config(compose(config_name="config", overrides=["run_dir=.", *job]))


if __name__ == "__main__":
    if not CONF_DIR.is_dir():
        sys.exit(f"ftrl: config directory {CONF_DIR} not found; install the project with `pip install -e .`")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from ftrl.errors import FtrlError

    try:
        precheck(sys.argv[1:])
    except FtrlError as error:
        logging.basicConfig(format="[%(name)s][%(levelname)s] %(message)s")
        sys.exit(_user_error(error))
    hydra_main()
